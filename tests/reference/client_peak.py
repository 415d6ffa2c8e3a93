"""Runs a command and prints its wall time, its peak host RSS and its peak GPU memory
(nvidia-smi's per-process figure, polled every 0.2 s), then its output without the
`wrote` lines. Used by e2e_gpu.sh to compare what a `gen` client holds."""
import resource
import subprocess
import sys
import time

cmd = sys.argv[1:]
start = time.time()
proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
gpu_mib = 0
while proc.poll() is None:
    apps = subprocess.run(
        ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
    ).stdout
    for line in apps.splitlines():
        pid, used = [f.strip() for f in line.split(",")]
        if pid == str(proc.pid):
            gpu_mib = max(gpu_mib, int(used))
    time.sleep(0.2)
out = proc.stdout.read()
rss_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1e6
print(f"rc {proc.returncode}, wall {time.time() - start:.1f} s, peak RSS {rss_gb:.2f} GB, peak GPU memory {gpu_mib} MiB")
print("\n".join(line for line in out.splitlines() if not line.startswith("wrote")))
