"""tunesmith: fine-tune pretrained language models from one YAML file, and prove the fine-tune helped."""

__version__ = "0.1.0"
