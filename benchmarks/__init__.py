"""omnitok's benchmarks, each against its peer measured in the same run, each its own module run from the repository
root: ``python -m benchmarks.image``, ``audio``, ``tokenize``, ``pretrain``, ``packing``, ``sample``, ``loss``
(``--help`` on each). Not part of the installed package; ``synthetic`` makes the shards the training benchmarks and
the tests share."""
