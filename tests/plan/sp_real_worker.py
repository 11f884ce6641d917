"""One rank of a real 2-process gloo step with sequence parallelism, its peak measured by torch.profiler.

python sp_real_worker.py CONFIG SEQ_LEN BATCH RANK WORLD PORT OUT_JSON (started by test_plan_sequence_parallel.py)
The peak comes from the CPU allocator's memory events (independent of the planner's tracker), plus the
parameters, buffers and optimizer state that exist before the step."""
import json
import os
import sys
import tempfile

import torch


def main(config_path, seq_len, batch, rank, world, port, out_path):
    import torch.distributed as dist
    from torch.profiler import ProfilerActivity, profile

    from fastsft.distributed.ulysses import SequenceGroup
    from fastsft.plan import load_plan_config
    from fastsft.plan.step import PreparedModel

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        config = load_plan_config(config_path)
        torch.manual_seed(0)
        prepared = PreparedModel(config, "fastsft", fake=False)
        group = SequenceGroup(dist.group.WORLD, world, rank)
        tensors = list(prepared.model.parameters()) + list(prepared.model.buffers())
        tensors += [v for s in prepared.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]
        existing = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            prepared.run_real(seq_len, batch, group=group)
        with tempfile.TemporaryDirectory() as tmp:
            trace = os.path.join(tmp, "trace.json")
            prof.export_chrome_trace(trace)
            with open(trace) as handle:
                events = [e["args"] for e in json.load(handle)["traceEvents"] if e.get("name") == "[memory]"]
        running = peak = 0
        for event in events:
            if event.get("Device Type", 0) == 0:  # CPU
                running += event["Bytes"]
                peak = max(peak, running)
        with open(out_path, "w") as handle:
            json.dump({"rank": rank, "existing": existing, "step_peak": peak, "peak": existing + peak}, handle)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    path, seq, batch, rank, world, port, out = sys.argv[1:8]
    main(path, int(seq), int(batch), int(rank), int(world), int(port), out)
