"""The reward role for learned reward models: an HF sequence-classification model in a Ray actor.

``roles.reward.sources: [{model: /path/to/rm, weight: 1.0}]``. The model scores the chat- or plain-
text concatenation of prompt and response (the score of the last non-pad token, as HF's
``*ForSequenceClassification`` heads do); ``trust_remote_code`` follows the recipe's model setting.
"""
from __future__ import annotations


class RewardModelWorker:
    def __init__(self, path: str, *, trust_remote_code: bool = False, batch_size: int = 16):
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from prefopt.models.tiny import resolve_model_path

        path = resolve_model_path(path)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "right"
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, trust_remote_code=trust_remote_code, use_safetensors=True).to(self.device).eval()
        self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.batch_size = batch_size

    def score(self, texts: list[str]) -> list[float]:
        """One scalar per text (prompt + response)."""
        import torch
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(texts[i:i + self.batch_size], return_tensors="pt", padding=True,
                                     truncation=True).to(self.device)
                out += self.model(**enc).logits[:, 0].float().tolist()
        return out
