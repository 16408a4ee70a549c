"""kernels: the summaries' math and the C kernels (compiled at first use)."""
