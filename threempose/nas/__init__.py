"""The search space: candidate ops, cells, the fabric supernet, sampling, cost, genotypes."""
