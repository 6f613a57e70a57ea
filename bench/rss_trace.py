#!/usr/bin/env python3
"""Resident memory of a command over time, by step (issue 19).

Runs COMMAND, samples /proc/PID/status every INTERVAL seconds (VmRSS and
its parts: RssAnon, the process's own memory; RssFile, pages of mapped
files; RssShmem) and reads the command's stderr, whose progress lines
(moec's "[moec] ..." steps) name the step each sample falls in. Prints
JSON: the peak of each part, the step the peak fell in, the kernel's own peak
(max_rss, from wait4: it sees a spike between samples), and per step the
largest RSS and its anon/file split; --samples FILE also writes every
sample (one JSON object per line).

Usage: bench/rss_trace.py [--interval S] [--samples FILE] -- COMMAND...
"""
import json
import os
import subprocess
import sys
import threading
import time


def read_status(pid):
    parts = {}
    try:
        with open("/proc/%d/status" % pid) as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                    parts[key] = int(value.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        return None
    return parts


def main():
    args = sys.argv[1:]
    interval, samples_path = 0.2, None
    while args and args[0] != "--":
        if args[0] == "--interval":
            interval = float(args[1])
            args = args[2:]
        elif args[0] == "--samples":
            samples_path = args[1]
            args = args[2:]
        else:
            sys.exit("rss_trace: unknown option %s (usage: rss_trace.py [--interval S] [--samples F] -- CMD...)"
                     % args[0])
    if not args or len(args) < 2:
        sys.exit("rss_trace: no command (usage: rss_trace.py [--interval S] [--samples F] -- CMD...)")
    command = args[1:]
    start = time.monotonic()
    process = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, errors="replace")
    step = ["(start)"]
    log = []

    def read_stderr():
        for line in process.stderr:
            sys.stderr.write(line)
            text = line.strip()
            if text:
                step[0] = text[:160]
                log.append({"t": round(time.monotonic() - start, 2), "line": step[0]})

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    samples = []
    # wait4 reaps the process with its own peak (ru_maxrss), which a spike
    # in the last interval before exit would escape from the samples.
    while True:
        pid, status, usage = os.wait4(process.pid, os.WNOHANG)
        if pid == process.pid:
            break
        parts = read_status(process.pid)
        if parts:
            parts["t"] = round(time.monotonic() - start, 2)
            parts["step"] = step[0]
            samples.append(parts)
        time.sleep(interval)
    reader.join(timeout=5)
    code = os.waitstatus_to_exitcode(status)
    process.returncode = code
    if samples_path:
        with open(samples_path, "w") as out:
            for s in samples:
                out.write(json.dumps(s) + "\n")
    result = {"command": command, "exit": code, "seconds": round(time.monotonic() - start, 1), "samples": len(samples),
              "max_rss": usage.ru_maxrss * 1024}
    if samples:
        peak = max(samples, key=lambda s: s.get("VmRSS", 0))
        result["peak"] = {k: peak.get(k) for k in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "t", "step")}
        result["peak_hwm"] = max(s.get("VmHWM", 0) for s in samples)
        result["peak_anon"] = max(s.get("RssAnon", 0) for s in samples)
        result["peak_file"] = max(s.get("RssFile", 0) for s in samples)
        steps = {}
        for s in samples:
            entry = steps.setdefault(s["step"], {"first_t": s["t"], "VmRSS": 0})
            if s.get("VmRSS", 0) > entry["VmRSS"]:
                entry.update({"VmRSS": s["VmRSS"], "RssAnon": s.get("RssAnon"), "RssFile": s.get("RssFile")})
        # The steps with the largest RSS, in time order.
        top = sorted(steps.items(), key=lambda kv: -kv[1]["VmRSS"])[:12]
        result["largest_steps"] = [dict(step=k, **v) for k, v in sorted(top, key=lambda kv: kv[1]["first_t"])]
    print(json.dumps(result, indent=1))
    sys.exit(code)


if __name__ == "__main__":
    main()
