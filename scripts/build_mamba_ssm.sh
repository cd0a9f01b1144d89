#!/usr/bin/env bash
# Build mamba_ssm's CUDA extension (selective_scan_cuda) from its sdist on a GPU machine, for sm_90 only, into a
# --target folder, so that `ssmtune bench` can time the authors' kernels beside ssmtune's:
#
#   pip download --no-deps --no-binary :all: mamba_ssm -d sdist
#   bash scripts/build_mamba_ssm.sh sdist /tmp/mamba_site > build.log 2>&1 &
#   cat /tmp/mamba_site.status           # written when done: "status=ok ..." or "status=fail ..."
#   PYTHONPATH=/tmp/mamba_site ssmtune bench selective_scan
#
# Arguments: <sdist-dir or .tar.gz> <target-dir>. With --patch-only first: extract and patch into <target-dir>
# (a source tree), print the diff, build nothing (works on a CPU machine without nvcc).
#
# causal_conv1d: when <sdist-dir> also holds a causal_conv1d-*.tar.gz (`pip download --no-deps --no-binary :all:
# causal_conv1d -d sdist`, or curl it from PyPI), it is built beside mamba_ssm, in parallel, for the same single
# architecture, into the same target (about 6 minutes, the longer of the two). mamba_ssm's decoding and
# transformers' fast Mamba / hybrid paths use it: without it they fall back to torch ops, about half as fast in
# decoding. The marker then also says cc1d=ok|fail|absent. Debug info is stripped from the built libraries.
#
# Build levels, tried in order until one builds and imports (MAMBA_BUILD_LEVELS, default "lean real full"):
#   full  setup.py's gencode list cut to arch=compute_90,code=sm_90 (about 3 minutes)
#   real  + no complex-weight kernels: the three *_complex.cu files leave the sources list, the complex instantiations
#         leave the three forward .cu files, and the weight-type dispatch in selective_scan.cpp loses its complex
#         branch (complex A then fails with "not implemented for weight type"); fp32/fp16/bf16 inputs all stay
#   lean  + variable B and C only (B, C of shape [B, N, L] or [B, G, N, L], as every Mamba block passes them): the
#         is_variable_B / is_variable_C switches of the fwd and bwd launchers become a TORCH_CHECK, so each .cu file
#         instantiates 4x fewer kernels; the kernels that remain are the same code as in the full build
# Env: MAMBA_BUILD_LEVELS, MAX_JOBS (16), MAMBA_GENCODE (arch=compute_90,code=sm_90), MAMBA_BUILD_MARKER
# (<target>.status), MAMBA_BUILD_LOG (optional: also append all output to this file), PYTHON (python3).
set -u -o pipefail

patch_only=0
if [ "${1:-}" = "--patch-only" ]; then
    patch_only=1
    shift
fi
if [ $# -ne 2 ]; then
    echo "usage: $0 [--patch-only] <sdist-dir-or-tar.gz> <target-dir>" >&2
    exit 2
fi
src_arg=$1
target=$(realpath -m "$2")
PY=$(command -v "${PYTHON:-python3}") || { echo "no ${PYTHON:-python3}" >&2; exit 2; }
PY=$(realpath -s "$PY")  # absolute: pip runs after a cd
levels=${MAMBA_BUILD_LEVELS:-lean real full}
marker=${MAMBA_BUILD_MARKER:-$target.status}
if [ -n "${MAMBA_BUILD_LOG:-}" ]; then
    exec > >(tee -a "$MAMBA_BUILD_LOG") 2>&1
fi
t0=$SECONDS
ts() { printf '[%s +%ds] build_mamba_ssm: %s\n' "$(date +%H:%M:%S)" $((SECONDS - t0)) "$*"; }

src_arg=$(realpath -m "$src_arg")
if [ -d "$src_arg" ]; then
    sdist=$(ls "$src_arg"/mamba_ssm-*.tar.gz 2>/dev/null | sort | tail -n 1)
else
    sdist=$src_arg
fi
if [ -z "$sdist" ] || [ ! -f "$sdist" ]; then
    ts "no mamba_ssm-*.tar.gz at $src_arg"
    [ $patch_only = 1 ] || echo "status=fail reason=no-sdist seconds=0" >"$marker"
    exit 2
fi

# patch_tree DIR LEVEL: edit an extracted source tree in place (python: exact anchors, each asserted)
patch_tree() {
    "$PY" - "$1" "$2" "${MAMBA_GENCODE:-arch=compute_90,code=sm_90}" <<'PYEOF'
import re
import sys
from pathlib import Path

root, level, gencode = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
assert level in ("full", "real", "lean"), level


def edit(rel, fn):
    p = root / rel
    old = p.read_text()
    new = fn(old)
    assert new != old, f"{rel}: patch changed nothing"
    p.write_text(new)


def setup_py(s):
    anchor = "    # HACK: The compiler flag -D_GLIBCXX_USE_CXX11_ABI"
    assert s.count(anchor) == 1, "setup.py: gencode anchor not found"
    cut = ("    if not HIP_BUILD:  # ssmtune benchmark build: one GPU architecture only\n"
           f"        cc_flag = [\"-gencode\", \"{gencode}\"]\n\n")
    s = s.replace(anchor, cut + anchor)
    if level != "full":
        lines = s.splitlines(keepends=True)
        keep = [ln for ln in lines if not re.match(r'\s*"csrc/selective_scan/selective_scan_bwd_\w+_complex\.cu",\s*$', ln)]
        assert len(lines) - len(keep) == 3, "setup.py: expected 3 complex sources"
        s = "".join(keep)
    return s


edit("setup.py", setup_py)

if level != "full":
    for t in ("fp32", "fp16", "bf16"):
        def fwd(s):
            pat = r"template void selective_scan_fwd_cuda<[\w:]+, complex_t>\(SSMParamsBase &params, cudaStream_t stream\);\n?"
            s2, k = re.subn(pat, "", s)
            assert k == 1, f"selective_scan_fwd_{t}.cu: {k} complex instantiations"
            return s2
        edit(f"csrc/selective_scan/selective_scan_fwd_{t}.cu", fwd)

    def cpp(s):
        pat = (r"[ \t]*\} else if \(WTYPE == at::ScalarType::ComplexFloat\) \{[ \t]*\\\n"
               r"[ \t]*using weight_t = c10::complex<float>;[ \t]*\\\n"
               r"[ \t]*__VA_ARGS__\(\);[ \t]*\\\n")
        s2, k = re.subn(pat, "", s)
        assert k == 1, f"selective_scan.cpp: {k} complex dispatch branches"
        return s2
    edit("csrc/selective_scan/selective_scan.cpp", cpp)

if level == "lean":
    def switch_h(s):
        return s.rstrip("\n") + "\n\n" + "\n".join([
            "// ssmtune benchmark build: a switch whose condition must hold (TORCH_CHECK), instantiating only `true`",
            "#define TRUE_ONLY_SWITCH(COND, CONST_NAME, ...)                                      \\",
            "    [&] {                                                                            \\",
            "        TORCH_CHECK((COND), \"this selective_scan_cuda build (ssmtune benchmarks) supports only \" \\",
            "                    #CONST_NAME \" = true\");                                           \\",
            "        constexpr bool CONST_NAME = true;                                            \\",
            "        return __VA_ARGS__();                                                        \\",
            "    }()",
            "",
        ])
    edit("csrc/selective_scan/static_switch.h", switch_h)
    for kind in ("fwd", "bwd"):
        def cuh(s):
            for flag in ("B", "C"):
                old = f"BOOL_SWITCH(params.is_variable_{flag}, kIsVariable{flag}, [&] {{"
                assert s.count(old) == 1, f"{kind}: {old!r} not found once"
                s = s.replace(old, "TRUE_ONLY_SWITCH" + old[len("BOOL_SWITCH"):])
            return s
        edit(f"csrc/selective_scan/selective_scan_{kind}_kernel.cuh", cuh)
print(f"patched {root} for level {level}")
PYEOF
}

# extract SDIST DEST: a fresh tree at DEST (the sdist's top folder stripped); prints nothing
extract() {
    rm -rf "$2" && mkdir -p "$2" && tar -xzf "$1" -C "$2" --strip-components=1
}

if [ $patch_only = 1 ]; then
    level=${levels%% *}
    orig=$target.orig
    extract "$sdist" "$orig" && extract "$sdist" "$target" || exit 1
    patch_tree "$target" "$level" || exit 1
    diff -ru "$orig" "$target"
    ts "patched tree for level $level at $target (original at $orig)"
    exit 0
fi

status=fail
used=none
cc1d=absent
write_marker() {
    echo "status=$status level=$used cc1d=$cc1d seconds=$((SECONDS - t0)) target=$target" >"$marker.tmp" && mv "$marker.tmp" "$marker"
}
trap write_marker EXIT
rm -f "$marker"

ts "sdist $sdist -> $target; levels: $levels; MAX_JOBS=${MAX_JOBS:-16}"
ts "$("$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)' 2>&1 | tail -n 1)"
ts "nvcc: $(command -v nvcc || echo 'not on PATH') $(nvcc --version 2>/dev/null | grep -o 'release [0-9.]*' || true)"
# causal_conv1d: its own sdist, built in the background while mamba_ssm builds (setup.py's gencode list cut to
# MAMBA_GENCODE, the same edit as mamba_ssm's "full" level)
cc1d_sdist=""
[ -d "$src_arg" ] && cc1d_sdist=$(ls "$src_arg"/causal_conv1d-*.tar.gz 2>/dev/null | sort | tail -n 1)
cc1d_pid=""
if [ -n "$cc1d_sdist" ]; then
    cc1d_work=/tmp/causal_conv1d_build
    if extract "$cc1d_sdist" "$cc1d_work" && "$PY" - "$cc1d_work/setup.py" "${MAMBA_GENCODE:-arch=compute_90,code=sm_90}" <<'PYEOF'
import re
import sys

path, gencode = sys.argv[1], sys.argv[2]
s = open(path).read()
pairs = r'cc_flag\.append\("-gencode"\)\s*\n\s*cc_flag\.append\("arch=compute_\d+,code=sm_\d+"\)'
found = re.findall(pairs, s)
assert found, "causal_conv1d setup.py: no gencode pairs found"
s = re.sub(pairs, "pass", s)
anchor = "    if FORCE_CXX11_ABI:"
assert s.count(anchor) == 1, "causal_conv1d setup.py: anchor not found"
s = s.replace(anchor, f'    cc_flag += ["-gencode", "{gencode}"]  # ssmtune benchmark build: one architecture\n' + anchor)
open(path, "w").write(s)
PYEOF
    then
        ts "causal_conv1d: building $cc1d_sdist in the background"
        rm -rf "$target.cc1d"
        (cd "$cc1d_work" && CAUSAL_CONV1D_FORCE_BUILD=TRUE MAX_JOBS=4 TORCH_CUDA_ARCH_LIST=9.0 \
            "$PY" -m pip install -v --no-build-isolation --no-deps --no-index --no-cache-dir --target "$target.cc1d" . \
            >"$target.cc1d.log" 2>&1) &
        cc1d_pid=$!
    else
        ts "causal_conv1d: patch failed"
        cc1d=fail
    fi
fi

for level in $levels; do
    tl=$SECONDS
    work=/tmp/mamba_ssm_build_$level
    ts "level $level: extract + patch in $work"
    if ! extract "$sdist" "$work" || ! patch_tree "$work" "$level"; then
        ts "level $level: patch failed"
        continue
    fi
    rm -rf "$target.partial"
    ts "+ (cd $work && MAMBA_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-16} $PY -m pip install -v --no-build-isolation --no-deps --no-index --no-cache-dir --target $target.partial .)"
    (cd "$work" && MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=FALSE MAX_JOBS=${MAX_JOBS:-16} TORCH_CUDA_ARCH_LIST=9.0 \
        "$PY" -m pip install -v --no-build-isolation --no-deps --no-index --no-cache-dir --target "$target.partial" .)
    rc=$?
    ts "level $level: pip exited $rc after $((SECONDS - tl)) s"
    if [ $rc -ne 0 ]; then
        continue
    fi
    if ! PYTHONPATH=$target.partial "$PY" -c 'import torch, selective_scan_cuda; print("selective_scan_cuda:", selective_scan_cuda.__file__)'; then
        ts "level $level: built but selective_scan_cuda does not import"
        continue
    fi
    PYTHONPATH=$target.partial "$PY" -c 'from mamba_ssm.ops.selective_scan_interface import selective_scan_fn; import mamba_ssm; print("mamba_ssm", mamba_ssm.__version__, "imports")' \
        || ts "level $level: note: the full mamba_ssm package does not import (the scan interface may still)"
    rm -rf "$target" && mv "$target.partial" "$target"
    status=ok
    used=$level
    ts "level $level: OK in $((SECONDS - tl)) s; total $((SECONDS - t0)) s; PYTHONPATH=$target"
    break
done
[ $status = ok ] || ts "FAILED: no level built (total $((SECONDS - t0)) s)"
if [ -n "$cc1d_pid" ]; then
    ts "causal_conv1d: waiting for its build"
    if wait "$cc1d_pid" && PYTHONPATH=$target.cc1d "$PY" -c 'import torch, causal_conv1d_cuda, causal_conv1d'; then
        mkdir -p "$target" && cp -r "$target.cc1d"/. "$target"/ && rm -rf "$target.cc1d"
        cc1d=ok
        ts "causal_conv1d: OK (log $target.cc1d.log)"
    else
        cc1d=fail
        ts "causal_conv1d: FAILED (log $target.cc1d.log)"
    fi
fi
# the libraries carry debug info several times their code's size: strip it (a folder small enough to copy around)
[ $status = ok ] && find "$target" -maxdepth 1 -name '*.so' -exec strip --strip-debug {} + 2>/dev/null
[ $status = ok ]
