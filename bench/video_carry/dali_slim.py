"""Shrink the nvidia-dali-cuda130 2.4.0 wheel so it fits the device tool's carry limit (64 MiB a call).

Why: the wheel is 199 MB; the session may make only two device calls. Three safe reductions:
  1. keep only the cpython-3.12 extension modules (the device runs Python 3.12);
  2. strip --strip-unneeded the DALI libraries (static symbol tables only; .dynsym stays);
  3. in every CUDA fatbin that holds an sm_90 cubin, zero the payloads of the other entries (sm_75/80/100/110/120
     cubins, PTX). The headers stay, so the driver still sees those entries, but on an H200 (sm_90) it picks the
     sm_90 cubin and never reads the others. Zeroed bytes compress to nothing.
Usage: python dali_slim.py UNPACKED_WHEEL_DIR    (then tar | xz)
"""
import glob, os, struct, subprocess, sys

MAGIC = 0xBA55ED50


def zero_foreign_cubins(path, keep_arch=90):
    data = bytearray(open(path, "rb").read())
    out = subprocess.run(["readelf", "-SW", path], capture_output=True, text=True, check=True).stdout
    zeroed = 0
    for line in out.splitlines():
        f = line.replace("[ ", "[").split()
        name = next((n for n in (".nv_fatbin", "__nv_relfatbin") if n in f), None)
        if name is None:
            continue
        i = f.index(name)
        zeroed += _zero_section(data, int(f[i + 3], 16), int(f[i + 4], 16), keep_arch)
    open(path, "wb").write(data)
    return zeroed


def _zero_section(data, off, size, keep_arch):
    pos, end_sec, zeroed = off, off + size, 0
    while pos < end_sec - 16:
        magic, _ver, hsz, fsz = struct.unpack_from("<IHHQ", data, pos)
        if magic != MAGIC:
            pos += 8
            continue
        entries, p, end = [], pos + hsz, pos + hsz + fsz
        while p < end:
            kind, _u, ehsz, psz = struct.unpack_from("<HHIQ", data, p)
            arch = struct.unpack_from("<I", data, p + 28)[0]
            entries.append((kind, arch, p + ehsz, psz))
            p += ehsz + psz
        if any(k == 2 and a == keep_arch for k, a, _, _ in entries):
            for k, a, start, n in entries:
                if not (k == 2 and a == keep_arch):
                    data[start:start + n] = bytes(n)
                    zeroed += n
        pos = end
    return zeroed


def main(root):
    dali = os.path.join(root, "nvidia", "dali")
    for f in glob.glob(os.path.join(dali, "*.cpython-*.so")):
        if "cpython-312-" not in f:
            os.remove(f)
    libs = glob.glob(os.path.join(dali, "libdali*.so")) + glob.glob(os.path.join(dali, "*.cpython-312-*.so"))
    subprocess.run(["strip", "--strip-unneeded", *libs], check=True)
    for f in libs + glob.glob(os.path.join(dali, ".libs", "*.so*")):
        z = zero_foreign_cubins(f)
        if z:
            print(f"{os.path.basename(f)}: zeroed {z / 1e6:.1f} MB of non-sm_90 device code")


if __name__ == "__main__":
    main(sys.argv[1])
