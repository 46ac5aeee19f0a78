"""Small models shared by several test files."""
import torch
from torch import nn


class Seq(nn.Module):
    """A recurrent classifier: LSTM or GRU over (batch, time, 16) features, then a linear head."""

    def __init__(self, cell="lstm", hidden=32, n_classes=4):
        super().__init__()
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(16, hidden, num_layers=1, batch_first=True)
        self.head = nn.Linear(hidden, n_classes)

    def forward(self, x):
        return self.head(self.rnn(x)[0][:, -1])


class ConvNet(nn.Module):
    """Two convs and two linears behind a stem, with a declared input size (what timm models declare),
    so the speed planner sees their shapes."""

    def __init__(self, hw: int = 8):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 64, 3, padding=1)
        self.b = nn.Conv2d(64, 64, 3, padding=1)
        self.fc1 = nn.Linear(64, 256)
        self.fc2 = nn.Linear(256, 10)
        self.pretrained_cfg = {"input_size": (3, hw, hw)}

    def forward(self, x):
        x = self.b(torch.relu(self.a(torch.relu(self.stem(x)))))
        return self.fc2(torch.relu(self.fc1(x.mean((2, 3)))))
