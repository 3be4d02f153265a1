"""Training on several processes (lessons 10 and 11): data parallelism, tensor and pipeline parallelism,
sharded data parallelism, activation memory, and the launcher that runs a part under torchrun.

This layer imports ``course_lib.parts`` and ``course_lib.tools``, never the layers above it.
"""
