"""The standard SAE evaluation: language-model loss with the reconstruction spliced in.

On held-out conversations, next-token cross-entropy is measured three ways: clean, with the
hook point's output replaced by the SAE's reconstruction, and with it zero-ablated. The
replacement happens at the positions the SAE was trained on (not special tokens or the
template's system prompt). Reported: the loss increase (spliced - clean) and the fraction of
loss recovered, 1 - (spliced - clean) / (zero - clean).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm import tqdm

from monitor.architectures import check_hidden_size, decoder_layer
from monitor.sae._base import SAE
from monitor.sae._collect import _system_prefix_tokens, encode_conversations, keep_mask


@dataclass(frozen=True)
class SpliceReport:
    conversations: int
    tokens: int
    clean_loss: float
    spliced_loss: float
    zero_ablated_loss: float

    @property
    def loss_increase(self) -> float:
        return self.spliced_loss - self.clean_loss

    @property
    def loss_recovered(self) -> float:
        return 1 - (self.spliced_loss - self.clean_loss) / (self.zero_ablated_loss - self.clean_loss)


@torch.no_grad()
def spliced_lm_loss(
    model: Any,
    tokenizer: Any,
    sae: SAE,
    conversations: list[dict[str, Any]],
    *,
    context_size: int = 256,
    batch_size: int = 8,
    progress: bool = True,
) -> SpliceReport:
    """CE loss of ``model`` on ``conversations`` clean / SAE-spliced / zero-ablated at ``sae.cfg.hook_point``."""
    check_hidden_size(model.config, sae.cfg.d_in, "sae d_in")
    layer = decoder_layer(model, sae.cfg.hook_point)
    device = model.get_input_embeddings().weight.device
    sae_device = sae.W_enc.device
    special = set(tokenizer.all_special_ids)
    prefix = _system_prefix_tokens(tokenizer)
    mode: dict[str, Any] = {"kind": "clean", "mask": None}

    def hook(module: Any, inputs: Any, output: Any) -> Any:
        if mode["kind"] == "clean":
            return output
        hidden = output[0] if isinstance(output, tuple) else output
        mask = mode["mask"]
        if mode["kind"] == "splice":
            x = hidden.float().to(sae_device)  # the SAE may sit on the CPU while the model is on a GPU
            repl = sae.decode(sae.encode(x)).to(hidden.device, hidden.dtype)
        else:
            repl = torch.zeros_like(hidden)
        new = torch.where(mask[..., None], repl, hidden)
        return (new, *output[1:]) if isinstance(output, tuple) else new

    handle = layer.register_forward_hook(hook)
    sums = {"clean": 0.0, "splice": 0.0, "zero": 0.0}
    n_tok = 0
    try:
        for i in tqdm(range(0, len(conversations), batch_size), desc="lm-loss", disable=not progress):
            batch = conversations[i : i + batch_size]
            enc = encode_conversations(tokenizer, batch, context_size)
            ids, att = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            mode["mask"] = keep_mask(ids, att, special, prefix)
            targets = ids[:, 1:].clone()
            targets[att[:, 1:] == 0] = -100
            for kind in sums:
                mode["kind"] = kind
                logits = model(input_ids=ids, attention_mask=att, use_cache=False).logits[:, :-1]
                loss = torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]).float(),
                    targets.reshape(-1),
                    ignore_index=-100,
                    reduction="sum",
                )
                sums[kind] += float(loss)
            n_tok += int((targets != -100).sum())
    finally:
        handle.remove()
    return SpliceReport(
        conversations=len(conversations),
        tokens=n_tok,
        clean_loss=sums["clean"] / n_tok,
        spliced_loss=sums["splice"] / n_tok,
        zero_ablated_loss=sums["zero"] / n_tok,
    )
