"""The serving benchmark's bookkeeping: the ratios to stock and the table (the measurement itself,
`python -m benchmarks.serve --quick`, starts a server per configuration: too long for the test
tiers);
and the /metrics gauge it reads the concurrency from, against a real HTTP server."""

import argparse
import http.server
import threading

from benchmarks import serve, speed
from retentivekv_vllm.cli import add_kv_arguments, merge_kv_arguments
from retentivekv_vllm.config import KVPolicyConfig


def result(name, ttft_ms, tpot_ms, tok_s, running):
    return {
        "name": name,
        "batch1": {"median_ttft_ms": ttft_ms, "median_tpot_ms": tpot_ms},
        "burst": {"output_throughput": tok_s, "max_running": running},
    }


def test_ratios_and_table():
    results = [
        result("stock", 4000.0, 20.0, 50.0, 4),
        result("retentive 0.2", 3000.0, 8.0, 125.0, 14),
    ]
    serve.add_ratios(results)
    assert results[1]["vs_stock"] == {
        "tpot_batch1_speedup": 2.5,
        "ttft_batch1": 0.75,
        "burst_output_tokens_per_s": 2.5,
        "burst_max_running": 3.5,
    }
    assert results[0]["vs_stock"]["tpot_batch1_speedup"] == 1.0
    meta = {
        "mode": "quick",
        "date": "d",
        "load_start": [0.5],
        "load_end": [0.6],
        "settings": serve.SETTINGS["quick"],
    }
    table = serve.summary_table({"meta": meta, "results": results}).splitlines()
    assert table[3] == "| retentive 0.2 | 3.00 s | 8.0 ms | 2.5x | 125.0 | 2.5x | 14 |"


def test_running_gauge_keeps_the_peak_of_the_servers_gauge():
    readings = [3.0, 7.0, 5.0]  # then 2.0 for ever
    served = threading.Semaphore(0)

    class Metrics(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            value = readings.pop(0) if readings else 2.0
            body = (
                f"# TYPE vllm:num_requests_running gauge\n"
                f'vllm:num_requests_running{{engine="0",model_name="m"}} {value}\n'
                f'vllm:num_requests_waiting{{engine="0",model_name="m"}} 9.0\n'
            ).encode()
            self.send_response(200)
            self.end_headers()
            self.wfile.write(body)
            served.release()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Metrics)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        gauge = serve.RunningGauge(f"http://127.0.0.1:{server.server_port}", interval=0.01)
        gauge.start()
        for _ in range(4):
            assert served.acquire(timeout=10)
        assert gauge.stop() == 7  # the peak: not the waiting count, not the last reading
    finally:
        server.shutdown()


def test_each_configuration_is_served_with_flags_that_mean_its_settings():
    """The flags `vllm serve` gets for each of the speed benchmark's configurations, parsed by the
    plugin's --kv-* flags, are the same settings the in-process run passes as additional_config."""
    configs = speed.configs((0.2, 0.05), speed.SHIPPED_MAPS["smollm2"])
    parser = argparse.ArgumentParser()
    add_kv_arguments(parser)
    for name, additional_config in configs:
        flags = serve.plugin_flags(additional_config)
        if additional_config is None:
            assert flags is None
            continue
        args = parser.parse_args(flags)
        merge_kv_arguments(args)
        assert KVPolicyConfig.from_additional_config(
            args.additional_config
        ) == KVPolicyConfig.from_additional_config(additional_config), name
