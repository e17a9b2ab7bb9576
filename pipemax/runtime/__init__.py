"""Everything that moves: KV pools (tensors), KV manager (ids and residency, no tensors), and,
as they land, the scheduler, stage executor and engine loop.

Imports point down: runtime may import models and kernels, never cli or the API.
"""
