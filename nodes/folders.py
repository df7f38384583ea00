"""ComfyUI's models/edit folder, where EDiT banks live."""
import os

import folder_paths

EDIT_FOLDER = "edit"


def register_edit_folder():
    """Register models/edit (following --base-directory) for .safetensors files, keeping any
    paths extra_model_paths.yaml already added."""
    default = os.path.join(folder_paths.models_dir, EDIT_FOLDER)
    paths, _ = folder_paths.folder_names_and_paths.get(EDIT_FOLDER, ([], None))
    folder_paths.folder_names_and_paths[EDIT_FOLDER] = ([default] + [p for p in paths if p != default], {".safetensors"})


def edit_folder() -> str:
    return folder_paths.get_folder_paths(EDIT_FOLDER)[0]
