"""Real PEFT LoRA adapters for the demo model, made in the tests (random, seeded weights)."""

from __future__ import annotations

from pathlib import Path


def make_adapter(
    base_folder: Path,
    out: Path,
    *,
    rank: int,
    targets: list[str],
    seed: int,
    scale: float = 0.3,
    alpha: int | None = None,
) -> Path:
    """Save a LoRA adapter whose A and B are random (seeded), so it really changes some outputs.

    `scale` shrinks B so the model still writes text rather than noise.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_folder), dtype=torch.float32)
    config = LoraConfig(
        r=rank, lora_alpha=alpha or 2 * rank, target_modules=targets, init_lora_weights=False,
        lora_dropout=0.0, task_type="CAUSAL_LM",
    )
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(scale)
    peft_model.save_pretrained(str(out))
    (out / "README.md").unlink(missing_ok=True)
    return out
