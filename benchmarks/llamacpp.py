"""llama.cpp as a baseline for the benchmarks: built once from source, then called as tools.

    build()                  -> the build directory (cached under benchmarks/_work/llamacpp/)
    Tools(build_dir)         -> llama-bench, llama-perplexity, llama-quantize and the GGUF converter

The source is the llama.cpp that the `llama-cpp-python` source archive vendors, fetched with
`pip download` (PyPI is the one place the benchmarks may download from), and built for this CPU
(GGML_NATIVE, static, Release, no network support). Nothing of llama.cpp is copied here: its own
converter (`convert_hf_to_gguf.py`, with its `gguf-py` on PYTHONPATH) writes the GGUF files and its
own tools measure them; this module only runs them and reads their output.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

VERSION = "0.3.36"  # llama-cpp-python's release; the llama.cpp it vendors is what gets built
WORK = Path(__file__).parent / "_work" / "llamacpp"
TOOLS = ("llama-bench", "llama-perplexity", "llama-quantize")
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"  # its AMX matmul segfaults on Q8_0 here (AVX512-VNNI instead)
CMAKE_OPTIONS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                 "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
                 "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", f"-DCMAKE_C_FLAGS={NO_AMX}",
                 f"-DCMAKE_CXX_FLAGS={NO_AMX}")
_PPL = re.compile(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)")
_CHUNKS = re.compile(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+)")


def _run(command: list, log: Path | None = None, env: dict | None = None, nice: bool = True) -> str:
    """Run `command` and return its stdout; on failure the error holds the end of its output (and
    `log`, if given, all of it). Building and converting run niced (other jobs share this machine);
    measurements (`nice=False`) run as our own do."""
    prefix = ["nice", "-n", "10"] if nice else []
    done = subprocess.run([*prefix, *map(str, command)], capture_output=True, text=True, env=env)
    if log is not None:
        log.write_text(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{Path(str(command[0])).name} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done.stdout


def source(work: Path = WORK) -> Path:
    """The llama.cpp source tree, downloaded and unpacked once into `work`."""
    tree = work / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").exists():
        return tree
    archive = work / f"llama_cpp_python-{VERSION}.tar.gz"
    if not archive.exists():
        print(f"==> pip download llama-cpp-python=={VERSION} (source archive)", flush=True)
        _run([sys.executable, "-m", "pip", "download", f"llama-cpp-python=={VERSION}", "--no-deps",
              "--no-binary", ":all:", "-d", work])
    with tarfile.open(archive) as tar:
        tar.extractall(work, filter="data")
    return tree


def build(work: Path = WORK) -> Path:
    """The build directory with llama.cpp's tools, configured and built once (2 jobs, niced), and
    again whenever CMAKE_OPTIONS change (the options it was built with are kept next to it)."""
    build_dir, stamp = work / "build", work / "build" / "cmake-options.txt"
    if all((build_dir / "bin" / tool).exists() for tool in TOOLS) and stamp.exists() \
            and stamp.read_text() == "\n".join(CMAKE_OPTIONS):
        return build_dir
    tree = source(work)
    print(f"==> building llama.cpp ({', '.join(TOOLS)}) in {build_dir}; this takes a while", flush=True)
    _run(["cmake", "-S", tree, "-B", build_dir, *CMAKE_OPTIONS], log=work / "cmake.log")
    _run(["cmake", "--build", build_dir, "-j", "2", "--target", *TOOLS], log=work / "build.log")
    stamp.write_text("\n".join(CMAKE_OPTIONS))
    return build_dir


@dataclass(frozen=True)
class Tools:
    """llama.cpp's tools in `build_dir` (a CMake build directory, or any folder holding the binaries)."""

    build_dir: Path

    def tool(self, name: str) -> Path:
        for path in (self.build_dir / "bin" / name, self.build_dir / name):
            if path.is_file():
                return path
        raise FileNotFoundError(f"{name} is not in {self.build_dir} or its bin/; build it "
                                f"(`cmake --build {self.build_dir} --target {' '.join(TOOLS)}`) or drop --llamacpp")

    def source(self) -> Path:
        """The source tree the build came from (CMakeCache.txt says), else the downloaded one."""
        cache = self.build_dir / "CMakeCache.txt"
        if cache.exists():
            found = re.search(r"^CMAKE_HOME_DIRECTORY:INTERNAL=(.+)$", cache.read_text(), re.MULTILINE)
            if found and (Path(found[1]) / "convert_hf_to_gguf.py").exists():
                return Path(found[1])
        return source()

    def version(self) -> str:
        """llama.cpp's version line, as its tools print it."""
        done = subprocess.run([self.tool("llama-bench"), "--version"], capture_output=True, text=True)
        lines = (done.stdout + done.stderr).strip().splitlines()
        found = next((line for line in lines if line.startswith("version: ")), None)
        return found.removeprefix("version: ") if found else "(version unknown)"

    def convert(self, model_dir: Path, outtype: str, out: Path) -> Path:
        """`convert_hf_to_gguf.py MODEL_DIR --outtype OUTTYPE` into `out` (written aside, then renamed)."""
        tree = self.source()
        env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
        partial = out.with_suffix(".partial")
        _run([sys.executable, tree / "convert_hf_to_gguf.py", model_dir, "--outtype", outtype, "--outfile", partial],
             log=out.with_suffix(".log"), env=env)
        partial.rename(out)
        return out

    def quantize(self, source_gguf: Path, kind: str, out: Path, threads: int) -> Path:
        """`llama-quantize SOURCE OUT KIND` (e.g. Q4_0 from the F32 file)."""
        partial = out.with_suffix(".partial")
        _run([self.tool("llama-quantize"), source_gguf, partial, kind, threads], log=out.with_suffix(".log"))
        partial.rename(out)
        return out

    def bench(self, gguf: Path, threads: int, prefill: int, decode: int) -> dict[str, float]:
        """One `llama-bench -r 1` of prefill and decode: {'prefill', 'decode'} tokens/s."""
        out = _run([self.tool("llama-bench"), "-m", gguf, "-t", threads, "-p", prefill, "-n", decode,
                    "-r", 1, "-o", "json"], nice=False)
        return parse_bench(out, prefill, decode)

    def perplexity(self, gguf: Path, text: Path, context: int, chunks: int, threads: int) -> dict[str, float]:
        """`llama-perplexity` over the first `chunks` windows of `context` tokens of `text`."""
        log = gguf.with_name(gguf.stem + f"-ppl-c{context}x{chunks}.log")
        _run([self.tool("llama-perplexity"), "-m", gguf, "-f", text, "-c", context, "--chunks", chunks,
              "-t", threads], log=log, nice=False)
        return parse_perplexity(log.read_text())


def parse_bench(text: str, prefill: int, decode: int) -> dict[str, float]:
    """{'prefill', 'decode'} tokens/s from `llama-bench -o json` output: the test with `prefill`
    prompt tokens and no generation, and the one generating `decode` tokens from an empty context.

    Raises:
        ValueError: the output lacks one of the two tests.

    Example:
        >>> parse_bench('[{"n_prompt": 8, "n_gen": 0, "avg_ts": 90.5}, {"n_prompt": 0, "n_gen": 4, "avg_ts": 20.0}]', 8, 4)
        {'prefill': 90.5, 'decode': 20.0}
    """
    tests = {(int(t["n_prompt"]), int(t["n_gen"])): float(t["avg_ts"]) for t in json.loads(text)}
    wanted = {"prefill": (prefill, 0), "decode": (0, decode)}
    missing = [f"{k} (n_prompt={p}, n_gen={g})" for k, (p, g) in wanted.items() if (p, g) not in tests]
    if missing:
        raise ValueError(f"llama-bench output has no {' or '.join(missing)} test; it has {sorted(tests)}")
    return {key: tests[test] for key, test in wanted.items()}


def parse_perplexity(log: str) -> dict[str, float]:
    """{'ppl', 'error', 'chunks', 'context', 'scored_tokens'} from a `llama-perplexity` log. It scores
    the second half of each window (tokens context/2 .. context-1), after the first half as context.

    Raises:
        ValueError: the log has no final estimate (the run failed or the text is too short).

    Example:
        >>> parse_perplexity("calculating perplexity over 2 chunks, n_ctx=8, ...\\nFinal estimate: PPL = 12.5 +/- 0.3")
        {'ppl': 12.5, 'error': 0.3, 'chunks': 2, 'context': 8, 'scored_tokens': 6}
    """
    final, chunks = _PPL.search(log), _CHUNKS.search(log)
    if final is None or chunks is None:
        raise ValueError(f"no perplexity in llama-perplexity's log; its end:\n{log[-2000:]}")
    count, context = int(chunks[1]), int(chunks[2])
    return {"ppl": float(final[1]), "error": float(final[2]), "chunks": count, "context": context,
            "scored_tokens": count * (context - 1 - context // 2)}
