"""Export checkpoints (and plans) to peer formats: compressed-tensors, GPTQModel, torchao, optimum-quanto.

`adatsq.export.convert.export` is the entry point; each target is one module registered in `EXPORTERS`.
"""
