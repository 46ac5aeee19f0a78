"""Small models shared by several test files."""
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
