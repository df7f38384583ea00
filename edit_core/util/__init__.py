"""Small helpers shared by the packages: safetensors I/O, tensor-memory counting, plots and
command-line options."""
