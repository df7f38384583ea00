"""File names of the built-in tiny models (written by ``tiny_models.write_tiny_models``);
apart from it so that code without ComfyUI (workflow edits) can name them."""
TINY_SD35 = "edit_tiny_sd35.safetensors"
TINY_PIXART = "edit_tiny_pixart.safetensors"
# New names for the seeded VAEs: files are never rewritten, and the old names may hold the
# uninitialised (NaN-decoding) VAEs of earlier versions in a reused --out folder.
TINY_VAE16 = "edit_tiny_vae16.safetensors"
TINY_VAE4 = "edit_tiny_vae4.safetensors"
# Untrained EDiT banks for the two tiny models (models/edit/).
TINY_BANKS = {"sd35": "edit_tiny_sd35_bank.safetensors", "pixart": "edit_tiny_pixart_bank.safetensors"}
