"""Ray, and only here: starting or joining a cluster and the object store (``cluster.py``), the pool of
generic model actors that run plain functions on a loaded model (``pool.py``), and Ray Train's driver
and worker session (``train.py``). Imports ``core`` only: the work it runs is passed in by reference."""
