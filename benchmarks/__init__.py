"""Efficiency and throughput benchmarks: ``python -m benchmarks [SUITE] [--flags] [--json]``.

Run from the repository root (like ``run.py``); ``docs/benchmarks.md`` has the commands, the
method and the measured figures. Layout: ``__main__.py`` (the command line and tables),
``common.py`` (settings, peaks, FLOPs, models, batches, result lines) and one module per suite.

Suites (``all``, the default, runs efficiency, train and input in one process):

* ``efficiency`` (``efficiency.py``): the paper's table. Parameters (total and without
  embeddings) and inference time of BERT_12/6/3 (``--layers``) at batch 128, seq 128: ms per
  batch, examples/s and the speed-up over the deepest model. Random weights of the ``--model``
  size (speed only).
* ``train`` (``train_steps.py``): the project's own jitted steps (``steps.make_finetune_step`` /
  ``make_distill_step`` + ``steps.compile_step`` on ``partitioning.make_mesh()``): fine-tuning the
  student, the PKD step with the teacher online and with cached teacher outputs; plus the
  PyTorch peer when torch is importable.
* ``torch`` (``torch_peer.py``): the PKD step(s) in JAX and the same step written with PyTorch
  ``transformers`` (eager; ``torch.compile`` too when CUDA is there), on the same device and
  shapes, and the ratio.
* ``input`` (``input.py``): tokenisation (uncached and cached) and host batch assembly
  examples/s against the examples/s the step consumes (the headroom must exceed 1: the
  accelerator must never wait).
* ``sweep`` (``sweep.py``, not in ``all``): ``--students`` G students (BERT_3 by default) trained
  by one vmapped chunk step (``pkd_jax.sweep``, cached teacher outputs, every student with another
  point of the ``configs/sweep.py`` grid and learning rate) against the same G students trained
  one after another (G calls of the single-student step), in students·examples/s; plus the chunk
  size ``sweep`` would pick here.

Timing (``pkd_jax.timing``): the step is compiled ahead of time (``compile_s``, reported apart),
run ``--warmup`` times untimed, then ``--repeats`` times, each call ending in
``jax.block_until_ready``; figures are medians. The batch stays on the device and the train state
is chained (donated) through the calls, as in training.

Model FLOPs (the MFU convention: analytic, not XLA's count). One forward pass of a BERT with L
layers, hidden H, intermediate I, sequence S and C classes costs per example::

    F(L) = (L−1)·(2·S·(4H² + 2H·I) + 4·S²·H) + 2·S·2H² + 2·(2H² + 2H·I) + 4·S·H + 2H² + 2HC

(the Q, K, V, output and two FFN matmuls; QKᵀ and attention·V; in the top layer, which computes
only the [CLS] row (``bert.BertEncoder``), the keys and values of every row and the rest of one
row; the pooler and the classifier; embedding lookups, LayerNorm, softmax and the losses are
not counted). A training step costs 3·F(student) (forward + backward), plus F(teacher) when the
teacher runs online; inference costs F. ``tflops_per_s`` = FLOPs per step / median step time,
``mfu`` = that / the peak of every device the step runs on: on GPU/TPU the dense bfloat16 peak of
one JAX device from a table keyed by its kind (a GPU; a TPU chip from v4 on; one core, half a
chip, on v2/v3), times the device count (also for float32 runs, ``peak_dtype`` says so); on CPU
the measured matmul peak of the machine in the run's dtype.

``--profile DIR``: after timing, each JAX step runs ``--repeats`` more times under
``jax.profiler.trace`` into ``DIR/<suite>-<name>`` (the timings exclude the profiler): open it with
TensorBoard's or XProf's profile tool, or its ``perfetto_trace.json.gz`` in ui.perfetto.dev. A
trace lists every XLA op of the step with its time; ``XLA_FLAGS=--xla_dump_to=DIR`` adds the
optimised HLO that names them. The line of a profiled step has ``trace_dir`` and ``ops``: the op
time of one call, the shares of matmul-like and attention-like ops, and the top ops
(``common.op_summary``).

Every JSON line carries ``suite``, ``name``, the shapes, ``device``, ``versions`` and ``date``;
step lines also ``step_s_median``, ``examples_per_s``, ``tflops_per_s``, ``mfu`` and, where the
project sets one, ``targets`` (value, target, ok); targets are reported, never asserted.
"""
