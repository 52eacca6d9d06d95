"""One rank of a 2-process lm-eval run, started by test_eval_harness under torchrun: the model
`elbokto` (rank and world size from accelerate, gloo on CPU) on the local multiple-choice task.
Rank 0 writes the gathered results to argv[2]."""

import json
import os
import sys
from pathlib import Path

from lm_eval import simple_evaluate
from lm_eval.tasks import TaskManager

import elbokto.eval.harness  # noqa: F401  (registers the model "elbokto")

folder, out = sys.argv[1], Path(sys.argv[2])
tasks = Path(__file__).resolve().parent / "lm_eval_tasks"
os.chdir(tasks)  # the task names its data relative to here
results = simple_evaluate(
    model="elbokto",
    device="cpu",
    tasks=["elbokto_mc"],
    log_samples=True,
    model_args=f"pretrained={folder},mc_num=4,mc_chunk_size=4,kernel_backend=torch",
    task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
)
if results is not None:  # rank 0 only
    samples = sorted(results["samples"]["elbokto_mc"], key=lambda s: s["doc_id"])
    out.write_text(
        json.dumps(
            {
                "world_size": int(os.environ["WORLD_SIZE"]),
                "acc": results["results"]["elbokto_mc"]["acc,none"],
                "requests": [[list(a) for a in s["arguments"]] for s in samples],
                "values": [[float(r[0][0]) for r in s["resps"]] for s in samples],
            }
        )
    )
# Skip interpreter teardown: gloo's threads sometimes abort at exit after the work is done.
os._exit(0)
