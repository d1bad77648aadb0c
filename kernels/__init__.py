"""CUDA C sources for the CuPy backend, installed as the numres.kernels subpackage."""
