"""The finetune pipeline: config, instruction data, the refusal filter, the job a training worker
gets (``job.py``), the driver (``train.py``), the loop each Ray Train worker runs (``train_loop.py``) and
the checkpoint export. Imports ``core``, ``directions`` (the filter's saved direction) and ``runtime``
(the Ray Train session the loop runs in)."""
