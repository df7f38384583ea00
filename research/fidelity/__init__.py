"""The fidelity study: teachers trained on real captioned images (emoji), the measures that
compare students with them, and the study driver and report."""
