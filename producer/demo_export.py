"""The demo laid out the way a deployment keeps its files under /data (docs/deploying.md):

    models/smollm2-135m-instruct/   the converted demo model (safetensors)
    adapters/arith/                 the demo adapter
    datasets/arith.jsonl            the demo dataset
    configs/demo.yaml               the demo config, naming the three above by relative paths

`lora-compare demo --export DIR` (or `-`: a tar stream on stdout, for `docker compose run -T cli ...
| tar -x -C data`) writes it once, from one host; every worker that mounts the same folder then loads
the model from it and never downloads anything.
"""

from __future__ import annotations

import io
import re
import shutil
import tarfile
from pathlib import Path
from typing import BinaryIO

import yaml

from contract.settings import DEMO_MODEL_FOLDER

_SKIP = {".converted"}  # the cache's own marker


def demo_layout(model_dir: Path, demo_config: Path) -> dict[str, Path | bytes]:
    """Relative path under the data folder -> the file to copy there (or the bytes to write)."""
    source = yaml.safe_load(demo_config.read_text(encoding="utf-8"))
    here = demo_config.parent
    adapters = source["model"]["adapters"]
    files: dict[str, Path | bytes] = {}
    for item in sorted(model_dir.iterdir()):
        if item.is_file() and item.name not in _SKIP:
            files[f"models/{DEMO_MODEL_FOLDER}/{item.name}"] = item
    for name, folder in adapters.items():
        for item in sorted((here / folder).iterdir()):
            files[f"adapters/{name}/{item.name}"] = item
    dataset = here / source["dataset"]["path"]
    files[f"datasets/{dataset.name}"] = dataset
    text = demo_config.read_text(encoding="utf-8")  # rewritten line by line, keeping its comments
    moves = [("base", source["model"]["base"], f"../models/{DEMO_MODEL_FOLDER}"),
             ("path", source["dataset"]["path"], f"../datasets/{dataset.name}")]
    moves += [(name, folder, f"../adapters/{name}") for name, folder in adapters.items()]
    for key, old, new in moves:
        text = re.sub(rf"^(\s*{re.escape(key)}:\s*){re.escape(old)}(?:\s.*)?$", rf"\g<1>{new}", text, count=1,
                      flags=re.M)
    config = yaml.safe_load(text)
    assert config["model"]["base"] == moves[0][2] and config["dataset"]["path"] == moves[1][2], text
    assert config["model"]["adapters"] == {name: f"../adapters/{name}" for name in adapters}, text
    header = ("# The demo, exported by `lora-compare demo --export`: paths are relative to this file, so it\n"
              "# works wherever the data folder is mounted (submit /data/configs/demo.yaml in Docker).\n")
    files["configs/demo.yaml"] = (header + text).encode()
    return files


def write_layout(files: dict[str, Path | bytes], target: Path) -> None:
    """Copy the layout into the folder `target` (created if missing; existing files are replaced)."""
    for rel, src in files.items():
        dest = target / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(src, bytes):
            dest.write_bytes(src)
        else:
            shutil.copyfile(src, dest)


def write_tar(files: dict[str, Path | bytes], stream: BinaryIO) -> None:
    """The layout as an uncompressed tar stream (folders 0755, files 0644, owned by whoever extracts it)."""
    with tarfile.open(fileobj=stream, mode="w|") as tar:
        for folder in sorted({str(Path(rel).parent) for rel in files} | _parents(files)):
            info = tarfile.TarInfo(folder)
            info.type, info.mode = tarfile.DIRTYPE, 0o755
            tar.addfile(info)
        for rel, src in files.items():
            data = src if isinstance(src, bytes) else None
            info = tarfile.TarInfo(rel)
            info.mode = 0o644
            if data is not None:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
            else:
                assert isinstance(src, Path)
                info.size = src.stat().st_size
                with src.open("rb") as handle:
                    tar.addfile(info, handle)


def _parents(files: dict[str, Path | bytes]) -> set[str]:
    out: set[str] = set()
    for rel in files:
        out.update(str(p) for p in Path(rel).parents if str(p) != ".")
    return out
