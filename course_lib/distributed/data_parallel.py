"""Data parallelism written out by hand: the reference solution of exercise 10.2, and a script torchrun runs.

Explained in notebooks/10_scaling_out.ipynb, section 3, where students write this file themselves with
``%%writefile``; below ``if __name__ == "__main__":`` the script is the notebook's template, word for word
(tests/test_checks_scripts.py keeps the two equal). Every rank draws its own initial weights (its own seed,
as real jobs seed every rank differently), so nothing is equal until rank 0's weights are broadcast; then each
rank trains on its own rows of every global batch with the course's loop, and an all-reduce averages the
gradients just before every optimiser step::

    torchrun --standalone --nproc_per_node=2 course_lib/distributed/data_parallel.py --out runs/by_hand --optimizer sgd

PyTorch's DistributedDataParallel (course_lib.distributed.ddp) does the same inside ``backward()``, bucket by bucket.
"""
import torch
import torch.distributed as dist

from course_lib.distributed import ddp, launch
from course_lib.parts.lm import lm_loss
from course_lib.parts.loop import train


def shard(batch, rank, world):
    """This rank's rows of a global batch of world × b rows: b of them, different rows on every rank."""
    b = batch.shape[0] // world
    return batch[rank * b:(rank + 1) * b]


def broadcast_weights(model):
    """Give every rank rank 0's weights."""
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p, src=0)


def average_gradients(model, world):
    """Replace every gradient by its mean over the ranks."""
    for p in model.parameters():
        dist.all_reduce(p.grad)      # the sum over the ranks, in place, on every rank
        p.grad /= world


if __name__ == "__main__":
    spec, out = ddp.script_arguments()                      # --out and the run's size (a ddp.DDPSpec)
    rank, world, device = launch.init(group_timeout_s=60)
    model = ddp.make_model(spec, seed=spec.seed + rank).to(device)   # every rank draws its own weights
    broadcast_weights(model)
    start = ddp.weights_of(model)
    optimizer = ddp.make_optimizer(model, spec)
    optimizer.register_step_pre_hook(lambda *_: average_gradients(model, world))   # after backward, before a step
    batches = [(shard(x, rank, world).to(device), shard(y, rank, world).to(device))
               for x, y in ddp.global_batches(spec, world)]
    history = train(model, iter(batches), lm_loss, ddp.loop_config(spec), optimizer=optimizer, device=device)
    ddp.save_run(out, rank, start=start, model=model, batches=batches, losses=history.losses)
    launch.finish()
