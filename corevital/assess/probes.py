"""Linear probes: the worked example of a user metric (`metrics.extra`).

A probe is a linear map read from a safetensors file, applied to one block's output at every
row: `weight` (k, hidden) or (hidden,), and an optional `bias` (k,). Its values land in
`summaries.parquet` as the column `name` (k = 1) or `name_0` .. `name_{k-1}` on that block's
rows (null on the other layers), and in the JSON trace under that layer's `extensions`:

    metrics:
      extra:
        - _target_: corevital.assess.probes.LinearProbe
          path: probes/truth.safetensors
          layer: 12
          name: truth

`sigmoid: true` writes sigmoid(w . h + b) (a probe trained as a logistic regression), else
the raw score. The product is made in float32 from the block's output in the model's dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch

from corevital.core import metrics


class LinearProbe(metrics.UserMetric):
    def __init__(self, path: str, layer: int, name: str = "probe", sigmoid: bool = False):
        from safetensors.torch import load_file

        if not Path(path).is_file():
            raise ValueError(f"probe file {path} does not exist")
        tensors = load_file(path)
        if "weight" not in tensors:
            raise ValueError(
                f"probe file {path} has no 'weight' tensor (it has {', '.join(sorted(tensors)) or 'none'})"
            )
        weight = tensors["weight"].float()
        self.weight = weight[None] if weight.dim() == 1 else weight  # (k, hidden)
        k = self.weight.shape[0]
        self.bias = tensors["bias"].float().reshape(k) if "bias" in tensors else torch.zeros(k)  # (k,)
        self.name, self.layers, self.sigmoid, self.path = name, (int(layer),), bool(sigmoid), path
        what = "sigmoid of the" if sigmoid else "the"
        columns = [name] if k == 1 else [f"{name}_{j}" for j in range(k)]
        self.metrics = tuple(
            metrics.user_metric(
                c, name, j, f"{what} linear probe {Path(path).name} (output {j}) on block {layer}'s output"
            )
            for j, c in enumerate(columns)
        )

    def bind(self, model) -> None:
        text = model.config.get_text_config()  # (the layer is in range: run.user_metrics checks every metric's)
        if self.weight.shape[1] != text.hidden_size:
            raise ValueError(
                f"probe {self.name}: {self.path} has {self.weight.shape[1]} inputs, the model's hidden "
                f"size is {text.hidden_size}"
            )

    def reduce(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:
        if self.weight.device != hidden.device:
            self.weight, self.bias = self.weight.to(hidden.device), self.bias.to(hidden.device)
        score = torch.nn.functional.linear(hidden.float(), self.weight, self.bias)  # (b, q, k)
        return torch.sigmoid(score) if self.sigmoid else score
