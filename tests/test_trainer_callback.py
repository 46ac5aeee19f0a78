"""ADMMTTCallback in transformers.Trainer: accumulation, logging, checkpoint/resume, compress at end."""
import os

import pytest
import torch
from torch import nn

import tn_hf
from tn_hf.admm import ADMMScheduler

transformers = pytest.importorskip("transformers")
from transformers import Trainer, TrainingArguments  # noqa: E402


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(8, 64)
        self.mid = nn.Linear(64, 64)
        self.out = nn.Linear(64, 3)

    def forward(self, x, labels=None):
        logits = self.out(torch.relu(self.mid(torch.relu(self.inp(x)))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


class DS(torch.utils.data.Dataset):
    def __init__(self, n=48):
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 8, generator=g), torch.randint(0, 3, (n,), generator=g)

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i], "labels": self.y[i]}


CFG = tn_hf.TNConfig(format="tt", ranks=2, target_modules=["mid"])


def _trainer(tmp_path, cb, **kw):
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path / "run"), per_device_train_batch_size=4,
                             gradient_accumulation_steps=2, max_steps=6, logging_steps=2, save_steps=3,
                             learning_rate=1e-2, use_cpu=True, report_to=[], disable_tqdm=True,
                             seed=0, **kw)
    return Trainer(model=Tiny(), args=args, train_dataset=DS(), callbacks=[cb])


def test_callback_trains_logs_saves_resumes_and_compresses(tmp_path):
    cb = tn_hf.ADMMTTCallback(CFG, rho=0.1, update_every=2, compress_at_end=False)
    tr = _trainer(tmp_path, cb)
    tr.train()
    s = cb.sched
    assert s.steps == 6 and s.updates == 3  # 12 micro-batches, accumulation 2 -> 6 real steps
    logged = [h for h in tr.state.log_history if "admm_primal" in h]
    assert len(logged) >= 3 and all(h["admm_rho"] == 0.1 for h in logged)
    assert logged[-1]["admm_primal"] == pytest.approx(s.residuals()["primal"]) and logged[-1]["admm_dual"] > 0
    ck = tmp_path / "run" / "checkpoint-3"
    assert (ck / "admm_state.safetensors").is_file() and (ck / "admm_state.json").is_file()
    assert isinstance(tr.model.mid, nn.Linear)  # compress_at_end=False
    final_Z = {k: v.clone() for k, v in s.Z.items()}

    # resume from checkpoint-3: the ADMM state comes back and training ends where the first run did
    cb2 = tn_hf.ADMMTTCallback(CFG, rho=0.1, update_every=2, compress_at_end=True)
    tr2 = _trainer(tmp_path, cb2)
    loaded = {}
    from tn_hf.admm import ADMMScheduler
    real_load = ADMMScheduler.load

    def spy(self, d):
        real_load(self, d)
        loaded.update(dir=str(d), steps=self.steps)
    ADMMScheduler.load = spy
    try:
        tr2.train(resume_from_checkpoint=str(ck))
    finally:
        ADMMScheduler.load = real_load
    assert loaded == {"dir": str(ck), "steps": 3}
    assert cb2.sched.steps == 6 and cb2.sched.updates == 3
    for k in final_Z:
        assert torch.equal(cb2.sched.Z[k], final_Z[k])
    # compress_at_end: the model now holds a TT layer at the ADMM ranks and save_model writes it
    assert isinstance(tr2.model.mid, tn_hf.layers.TTLinear)
    assert tr2.model.mid.ranks == cb2.sched.ranks["mid"]
    assert cb2.report.rows[0]["name"] == "mid"


def test_callback_epoch_updates_bf16_eval_and_best_model(tmp_path):
    cb = tn_hf.ADMMTTCallback(CFG, rho=0.05, update_every="epoch", w_step="grad")  # the paper's setting
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path / "e"), per_device_train_batch_size=8, num_train_epochs=2,
                             use_cpu=True, report_to=[], disable_tqdm=True, save_strategy="epoch",
                             bf16=True, eval_strategy="epoch", logging_steps=3, load_best_model_at_end=True)
    tr = Trainer(model=Tiny(), args=args, train_dataset=DS(), eval_dataset=DS(16), callbacks=[cb])
    tr.train()
    assert cb.sched.updates == 2 and cb.sched.steps == 12
    assert any("eval_loss" in h for h in tr.state.log_history)
    assert tr.state.best_model_checkpoint is not None  # best model loaded first, then compressed
    assert (tmp_path / "e" / "checkpoint-12" / "admm_state.safetensors").is_file()
    assert isinstance(tr.model.mid, tn_hf.layers.TTLinear)


# ---------------------------------------------------------------------------- save / resume (exact)
class Stop(transformers.TrainerCallback):
    """Interrupts a run after ``at`` optimizer steps (as a crash would), leaving its schedules unchanged."""
    def __init__(self, at):
        self.at = at

    def on_step_end(self, args, state, control, **kw):
        if state.global_step >= self.at:
            control.should_training_stop = True


def _run(out, cb_kw=None, cfg=CFG, resume=None, lr=1e-2, stop=None, **kw):
    """One Trainer run (6 real steps per epoch); returns (trainer, callback)."""
    cb = tn_hf.ADMMTTCallback(cfg, compress_at_end=False, **(cb_kw or {}))
    torch.manual_seed(0)
    base = dict(output_dir=str(out), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_steps=6, logging_steps=2, save_steps=3, learning_rate=lr, use_cpu=True, report_to=[],
                disable_tqdm=True, seed=0)
    base.update(kw)
    tr = Trainer(model=Tiny(), args=TrainingArguments(**base), train_dataset=DS(),
                 callbacks=[cb] + ([Stop(stop)] if stop else []))
    tr.train(resume_from_checkpoint=resume)
    return tr, cb


def _assert_same(a, b):
    (ta, ca), (tb, cb) = a, b
    for (n, p), (_, q) in zip(ta.model.named_parameters(), tb.model.named_parameters()):
        assert torch.equal(p, q), n
    sa, sb = ca.sched, cb.sched
    assert (sa.rho, sa.steps, sa.epochs, sa.updates, sa.ranks) == (sb.rho, sb.steps, sb.epochs, sb.updates, sb.ranks)
    for kind in ("Z", "U", "Zprev"):
        for k, v in getattr(sa, kind).items():
            assert torch.equal(v, getattr(sb, kind)[k]), (kind, k)


def test_epoch_updates_with_step_saves_inside_the_epoch(tmp_path):
    # the first checkpoints come before the first Z/U update (Z and Zprev equal): saving must work
    tr, cb = _run(tmp_path / "r", {"update_every": "epoch"}, max_steps=-1, num_train_epochs=2, save_steps=2)
    assert cb.sched.updates == 2 and cb.sched.steps == 12
    for step, updates in ((2, 0), (4, 0), (6, 1), (8, 1)):
        meta = ADMMScheduler.read_meta(str(tmp_path / "r" / f"checkpoint-{step}"))
        assert (meta["steps"], meta["updates"]) == (step, updates)


RATIO_CFG = tn_hf.TNConfig(format="tt", compression_ratio=8.0, target_modules=["inp", "mid"])  # global allocation


@pytest.mark.parametrize("case", ["ratio_config", "epoch_boundary", "rotation"])
def test_resume_equals_uninterrupted_run(tmp_path, case, monkeypatch):
    if case == "ratio_config":  # ranks must come from the saved state, not from the checkpoint's weights
        kw, cfg, stop, ckpt = {}, RATIO_CFG, 4, "checkpoint-3"
    elif case == "epoch_boundary":  # a step save at the epoch's last step keeps that epoch's update
        kw = dict(cb_kw={"update_every": "epoch"}, max_steps=-1, num_train_epochs=3, save_steps=6)
        cfg, stop, ckpt = CFG, 7, "checkpoint-6"
    else:  # save_total_limit rotation; resume_from_checkpoint=True picks the last kept checkpoint
        kw, cfg, stop, ckpt = dict(save_steps=2, save_total_limit=1, max_steps=8), CFG, 5, True
    full = _run(tmp_path / "full", cfg=cfg, **kw)
    real_save = Trainer._save_checkpoint

    def checked_save(self, model, trial):  # the ADMM state is in place before the Trainer's own files
        d = os.path.join(self.args.output_dir, f"checkpoint-{self.state.global_step}")
        assert os.path.isfile(os.path.join(d, "admm_state.safetensors"))
        return real_save(self, model, trial)
    monkeypatch.setattr(Trainer, "_save_checkpoint", checked_save)
    _run(tmp_path / "part", cfg=cfg, stop=stop, **kw)  # interrupted
    if case == "rotation":
        assert sorted(os.listdir(tmp_path / "part")) == ["checkpoint-4"]
        assert (tmp_path / "part" / "checkpoint-4" / "admm_state.safetensors").is_file()
    resume = ckpt if ckpt is True else str(tmp_path / "part" / ckpt)
    resumed = _run(tmp_path / "part", cfg=cfg, resume=resume, **kw)
    _assert_same(full, resumed)


def test_state_comes_from_the_checkpoint_passed_to_train(tmp_path):
    a = _run(tmp_path / "a")
    _run(tmp_path / "b", lr=5e-2)  # another run with its own checkpoint-3 in the output dir used below
    resumed = _run(tmp_path / "b", resume=str(tmp_path / "a" / "checkpoint-3"))
    _assert_same(a, resumed)


# ---------------------------------------------------------------------------- defaults, logging, progress
def test_defaults_metrics_reach_loggers_before_ours_and_progress(tmp_path, capsys):
    seen = []

    class Recorder(transformers.TrainerCallback):  # stands for TensorBoard & co. (they run before user callbacks)
        def on_log(self, args, state, control, logs=None, **kw):
            seen.append(dict(logs))

    cb = tn_hf.ADMMTTCallback(CFG, progress=False)
    torch.manual_seed(0)
    args = TrainingArguments(output_dir=str(tmp_path / "d"), per_device_train_batch_size=4, max_steps=100,
                             logging_steps=25, save_strategy="no", use_cpu=True, report_to=[], disable_tqdm=True,
                             learning_rate=1e-3)
    tr = Trainer(model=Tiny(), args=args, train_dataset=DS(), callbacks=[Recorder(), cb])
    tr.train()
    s = cb.sched
    assert s.total_steps == 100 and s.update_every == 2 and s.w_step == "prox"
    assert s.rho == pytest.approx(10.0) and s.updates == 50
    train_logs = [h for h in seen if "loss" in h]
    assert len(train_logs) == 4 and all("admm_primal" in h and "admm_rho" in h for h in train_logs)
    assert train_logs[-1]["admm_primal"] < 0.01  # the run ends close to the low-rank set
    assert isinstance(tr.model.mid, tn_hf.layers.TTLinear) and tr.model.mid.ranks == s.ranks["mid"]
    err = capsys.readouterr().err
    assert "tn_hf compress" not in err and "ADMM projections" not in err  # progress=False honoured


def test_save_model_after_compression_writes_the_card_and_report(tmp_path):
    """``trainer.save_model(dir)`` after the callback decomposed the model writes README.md,
    compression.png and tn_hf_report.json next to the weights, as tn_hf.save_pretrained does."""
    import json
    cb = tn_hf.ADMMTTCallback(CFG, rho=0.1, update_every=2)
    tr = _trainer(tmp_path, cb, save_strategy="no")
    tr.train()
    out = tmp_path / "final"
    tr.save_model(str(out))
    assert {"model.safetensors", "README.md", "compression.png", "tn_hf_report.json"} <= {p.name for p in out.iterdir()}
    saved = json.loads((out / "tn_hf_report.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(cb.report.to_dict()["rows"], default=str))
    assert [r["name"] for r in saved["rows"]] == ["mid"] and saved["totals"]["method"] == "admm"
    card = (out / "README.md").read_text()
    assert "`mid`" in card and "tn_hf" in card and "ADMM" in card


def test_training_events_before_train_begin_name_the_missing_step():
    cb = tn_hf.ADMMTTCallback(CFG)
    for event in (cb.on_pre_optimizer_step, cb.on_step_end, cb.on_epoch_end):
        with pytest.raises(RuntimeError, match="before on_train_begin"):
            event(None, None, None)
