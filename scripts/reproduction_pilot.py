"""The pilot that placed the CPU reproduction's search ranges (docs/results/reproduction/pilot.md).

One seed per point, learning-rate sweeps per optimizer on mnist1d_resnet1d with every other
hyperparameter fixed (momentum or beta1 0.9, weight decay 1e-4 on the weights for every
optimizer, eps 1e-6, no warmup unless given), at batch 128 x 240 steps and batch 1,024 x 80 (and 120) steps. It only checks
that each searched range brackets the region where an optimizer works, with room on both sides;
it decides nothing about which optimizer is better. Each line of output is one run as JSON:

    python scripts/reproduction_pilot.py '[{"kind": "lars", "bs": 128, "steps": 240,
        "ev": 240, "lr": 100, "blr": 0.3}]'

kind: nesterov | lars (LARS weights + heavy ball bias/BN, bias/BN rate blr) | adam |
lamb (LAMB weights + Adam bias/BN, rate blr); warm: warmup steps (default 0).
"""
import json
import sys
import time

from batchlab.search.study import Goal, Target
from batchlab.train import RunConfig, train_and_evaluate
from batchlab.train.compilation_cache import enable_compilation_cache

enable_compilation_cache()

def sched(peak, warm=0, wp=1.0, dp=2.0, end=1e-4):
    return {"schedule": "piecewise_polynomial", "peak_value": peak, "end_value": end, "warmup_steps": warm, "warmup_power": wp, "decay_power": dp}

def cfg(kind, lr, blr=None, mom=0.9, wd=1e-4, warm=0):
    blr = lr if blr is None else blr
    if kind == "nesterov":
        def g(rate):
            return {"optimizer": "nesterov", "momentum": mom, "learning_rate": sched(rate, warm)}
        return {"weights": {**g(lr), "weight_decay": wd}, "bias_bn": g(blr)}
    if kind == "lars":
        return {"weights": {"optimizer": "lars", "momentum": mom, "weight_decay": wd, "trust_coefficient": 0.001, "learning_rate": sched(lr, warm)},
                "bias_bn": {"optimizer": "heavy_ball", "momentum": mom, "learning_rate": sched(blr, warm)}}
    if kind == "adam":
        def g(rate):
            return {"optimizer": "adam", "eps": 1e-6,
                    "learning_rate": sched(rate, warm, 1.0, 1.0, 0.0)}
        return {"weights": {**g(lr), "weight_decay": wd}, "bias_bn": g(blr)}
    if kind == "lamb":
        return {"weights": {"optimizer": "lamb", "eps": 1e-6, "weight_decay": wd, "learning_rate": sched(lr, warm, 1.0, 1.0, 0.0)},
                "bias_bn": {"optimizer": "adam", "eps": 1e-6, "learning_rate": sched(blr, warm, 1.0, 1.0, 0.0)}}

def run(kind, bs, steps, ev, lr, blr=None, seed=1, **kw):
    t = time.time()
    r = train_and_evaluate(RunConfig(workload="mnist1d_resnet1d", optimizer=cfg(kind, lr, blr, **kw), batch_size=bs,
        total_steps=steps, eval_every_steps=ev, seed=seed, hyperparameters={"virtual_batch_size": 32},
        target=Target("validation/accuracy", 0.9, Goal.MAXIMIZE)))
    out = dict(kind=kind, bs=bs, steps=steps, lr=lr, blr=blr, kw=kw, outcome=r.outcome.name,
               val=r.final_metrics.get("validation/accuracy"), train=r.final_metrics.get("train/accuracy"),
               stt=None if r.steps_to_target == float("inf") else r.steps_to_target,
               wall=round(time.time() - t, 2), train_s=round(r.train_time_s, 2))
    print(json.dumps(out), flush=True)
    return out

if __name__ == "__main__":
    spec = json.loads(sys.argv[1])  # a list of run() keyword arguments
    for item in spec:
        run(**item)
