"""The compiled-kernel cache: a library is loaded only from a folder nobody else can write,
only if this user owns it and its bytes are the ones recorded when it was compiled, and only
for the CPU it was built for."""

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from corevital.kernels import native

X86 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
cpu MHz\t\t: 2450.000
flags\t\t: fpu sse2 avx2 fma
bogomips\t: 4900.00

processor\t: 1
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
cpu MHz\t\t: 2450.123
flags\t\t: fpu sse2 avx2 fma
bogomips\t: 4900.00
"""
# aarch64: no "flags" line; Features and the implementer/part say which core
ARM_A = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics sve
CPU implementer\t: 0x41
CPU architecture: 8
CPU variant\t: 0x1
CPU part\t: 0xd40
CPU revision\t: 1
"""
ARM_B = ARM_A.replace(" sve", "").replace("0xd40", "0xd0c")


def test_the_key_holds_the_whole_cpu_description_on_every_architecture():
    a, b = native.cpu_signature(ARM_A, "aarch64"), native.cpu_signature(ARM_B, "aarch64")
    assert a != b, "two ARM cores with different features must not share a -march=native build"
    assert "features=fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics sve" in a and "cpu part=0xd40" in a
    x86 = native.cpu_signature(X86, "x86_64")
    assert "flags=fpu sse2 avx2 fma" in x86 and "model name=AMD EPYC 7B13" in x86
    assert "MHz" not in x86 and "bogomips" not in x86.lower(), "clock speeds vary from read to read"
    assert native.cpu_signature(X86.replace("2450.123", "2100.000"), "x86_64") == x86
    assert native.cpu_signature(X86.replace(" fma", ""), "x86_64") != x86
    big_little = ARM_A + "\n" + ARM_A.replace("processor\t: 0", "processor\t: 1").replace("0xd40", "0xd44")
    assert native.cpu_signature(big_little, "aarch64") != a, "every core's kind counts"


def _load_in_child(cache: Path, marker: Path) -> subprocess.CompletedProcess:
    """Load fused.c's library in a fresh process; prints whether its real entry point is there."""
    code = textwrap.dedent("""
        import logging, sys
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        from corevital.kernels import fused
        lib = fused._library()
        print(lib is not None and hasattr(lib, "attention_summary"))
    """)
    env = {**os.environ, "COREVITAL_CACHE_DIR": str(cache), "COREVITAL_MARKER": str(marker)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)


def _planted(tmp: Path, marker: Path) -> bytes:
    """A shared library whose load-time constructor leaves a file behind: what an attacker plants."""
    src = tmp / "evil.c"
    src.write_text(
        "#include <stdio.h>\n#include <stdlib.h>\n__attribute__((constructor)) static void run(void) {"
        ' const char *p = getenv("COREVITAL_MARKER"); FILE *f = p ? fopen(p, "w") : 0; if (f) fclose(f); }\n'
    )
    out = tmp / "evil.so"
    subprocess.run(["cc", "-shared", "-fPIC", "-o", str(out), str(src)], check=True)
    return out.read_bytes()


@pytest.fixture
def compiled(tmp_path):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler: apt-get install gcc")
    cache, marker = tmp_path / "cache", tmp_path / "ran"
    proc = _load_in_child(cache, marker)
    assert proc.stdout.strip() == "True", proc.stderr
    (so,) = (cache / "kernels").glob("fused-*.so")
    return cache, so, marker


def test_a_library_replaced_in_the_cache_is_never_loaded(compiled, tmp_path):
    cache, so, marker = compiled
    so.write_bytes(_planted(tmp_path, marker))  # the recorded hash no longer matches
    proc = _load_in_child(cache, marker)
    assert proc.stdout.strip() == "True" and not marker.exists(), proc.stderr
    assert native._sha256(so) == so.with_name(so.name + ".sha256").read_text(), "compiled again over the planted one"


def test_a_library_owned_by_another_user_is_never_loaded_even_with_a_matching_record(compiled, tmp_path):
    if os.getuid() != 0:
        pytest.skip("giving a file to another user needs root")
    cache, so, marker = compiled
    so.write_bytes(_planted(tmp_path, marker))
    so.with_name(so.name + ".sha256").write_text(native._sha256(so))  # a forged record
    os.chown(so, 65534, 65534)  # nobody's
    proc = _load_in_child(cache, marker)
    assert proc.stdout.strip() == "True" and not marker.exists(), proc.stderr


def test_a_cache_others_can_write_is_not_used(tmp_path):
    if shutil.which("cc") is None:
        pytest.skip("no C compiler: apt-get install gcc")
    shared, marker = tmp_path / "shared", tmp_path / "ran"
    (shared / "kernels").mkdir(parents=True)
    os.chmod(shared / "kernels", 0o777)  # a group scratch dir
    proc = _load_in_child(shared, marker)
    assert proc.stdout.strip() == "True", proc.stderr
    assert proc.stderr.count("can be written by other users") == 1
    assert list((shared / "kernels").iterdir()) == [], "nothing is written to, or loaded from, the shared folder"
