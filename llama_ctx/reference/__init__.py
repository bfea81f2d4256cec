"""Dense, obviously-correct definitions of the attention methods, written independently of their implementations.

Each module computes a method from its definition (explicit position matrices and visibility, full softmax, often
in float64) on small inputs. The tests compare the patched models against them.
"""
