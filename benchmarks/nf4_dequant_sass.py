"""Instruction mix of nf4._dequant_kernel compiled for sm_90 without a GPU.
    python benchmarks/nf4_dequant_sass.py BLOCK num_warps [EVEN 0|1]"""
import collections, os, re, subprocess, sys, tempfile
sys.path.insert(0, os.getcwd())
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fxopt.kernels import nf4
fn = nf4._dequant_kernel
block = int(sys.argv[1]); warps = int(sys.argv[2])
ptr = dict(P="*u8", CODE="*fp32", ABSMAX="*u8", ABSMAX2="*fp32", CODE2="*fp32", OFFSET="*fp32", OUT="*bf16")
cx = dict(BS=64, DOUBLE_QUANT=True, BLOCK=block, EVEN=bool(int(sys.argv[3])) if len(sys.argv) > 3 else True)
sig, consts, attrs = {}, {}, {}
for i, name in enumerate(fn.arg_names):
    if name in cx:
        sig[name] = "constexpr"; consts[(i,)] = cx[name]
    elif name in ptr:
        sig[name] = ptr[name]; attrs[(i,)] = [["tt.divisibility", 16]]
    else:
        sig[name] = "i64" if name == "NK" else "i32"; attrs[(i,)] = [["tt.divisibility", 16]]
k = triton.compile(ASTSource(fn, sig, consts, attrs), target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=1))
d = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
    f.write(k.asm["cubin"]); f.flush()
    sass = subprocess.run([os.path.join(d, "cuobjdump"), "-sass", f.name], capture_output=True, text=True).stdout
ops = re.findall(r"/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]+)", sass)
c = collections.Counter(o for o in ops)
print("total", len(ops), "bytes/thread", block // (32 * warps))
print(c.most_common(30))
