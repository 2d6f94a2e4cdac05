r"""The paper's hyper-parameter grid in one run: students trained side by side by one vmapped step.

  python run.py --config=configs/sweep.py:task=rte,teacher=runs/rte/teacher,layers=3,strategy=skip,glue_dir=../shared/glue \
      --workdir=runs/rte/sweep-skip3 --config.learning_rates=2e-4

  # A smaller grid, two learning rates and two seeds, 6 students per chunk:
  python run.py --config=configs/sweep.py:task=mrpc,teacher=runs/mrpc/teacher,layers=3,strategy=last,glue_dir=../shared/glue \
      --workdir=runs/mrpc/sweep-last3 --config.temperatures=5,10 --config.alphas=0.5,0.7 \
      --config.betas=100,500 --config.learning_rates=1e-4,2e-4 --config.seeds=0,1 --config.students_per_chunk=6

The grid is seeds x learning_rates x temperatures x alphas x betas (default: the paper's
T in {5, 10, 20}, alpha in {0.2, 0.5, 0.7}, beta in {10, 100, 500, 1000}, the pkd.py learning rate,
seed 0: 36 students). Every other field is pkd.py's. Each student equals the pkd.py run of its
grid point (`pkd_jax.sweep.point_config`), so alpha, beta, temperature, learning_rate and seed are
grid axes here, not single fields. `runlocal` shrinks the grid to 2 x 2 x 2 and the run to seconds.
"""

from configs import pkd

# The single-run fields that the grid replaces, and those a sweep does not use (test predictions:
# run pkd.py on the best point for them).
_REPLACED = ("alpha", "beta", "temperature", "learning_rate", "seed", "predict_test", "test_examples")


def _runlocal(arg: str | None) -> bool:
    """Whether the arg string (validated by pkd.get_config) sets runlocal."""
    for item in filter(None, (arg or "").split(",")):
        key, eq, value = item.partition("=")
        if key.strip() == "runlocal":
            return not eq or value.lower() in ("true", "1")
    return False


def get_config(arg=None):
    c = pkd.get_config(arg)  # the same args as pkd.py: task, teacher, model, layers, strategy, glue_dir, runlocal
    c.kind = "sweep"
    c.temperatures = (5.0, 10.0, 20.0)
    c.alphas = (0.2, 0.5, 0.7)
    c.betas = (10.0, 100.0, 500.0, 1000.0)
    c.learning_rates = (c.learning_rate,)
    c.seeds = (0,)  # students of one chunk share a seed: they see the same batches
    c.students_per_chunk = 0  # 0: as many as fit in device memory; 1 on CPU (sweep.auto_chunk_size)
    c.shard_students = False  # split the students over the devices (each sees the whole batch)
    c.memory_gb = 0.0  # device memory for the auto chunk size; 0: measured (CPU: half the RAM)
    for key in _REPLACED:
        del c[key]
    if _runlocal(arg):
        c.temperatures, c.alphas, c.betas = (5.0, 20.0), (0.2, 0.7), (10.0, 500.0)
        c.max_steps = 20
        c.eval_every_steps = 10
    return c
