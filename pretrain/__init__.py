"""pretrain: distributed GPT and BERT pretraining."""

__version__ = "0.1.0"
