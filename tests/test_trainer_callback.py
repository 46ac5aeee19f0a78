"""ADMMTTCallback in transformers.Trainer: accumulation, logging, checkpoint/resume, compress at end."""
import os

import pytest
import torch
from torch import nn

import tn_hf

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
        torch.testing.assert_close(cb2.sched.Z[k], final_Z[k], rtol=1e-5, atol=1e-6)
    # compress_at_end: the model now holds a TT layer at the ADMM ranks and save_model writes it
    assert isinstance(tr2.model.mid, tn_hf.layers.TTLinear)
    assert tr2.model.mid.ranks == cb2.sched.ranks["mid"]
    assert cb2.report.rows[0]["name"] == "mid"


def test_callback_epoch_updates_bf16_eval_and_best_model(tmp_path):
    cb = tn_hf.ADMMTTCallback(CFG, rho=0.05)  # update_every="epoch"
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
