"""The private MLflow helpers the flavor relies on, imported in this one module.

MLflow's own flavors use these to write environment files and resolve artifacts; isolating them
keeps a future MLflow rename a one-file change.
"""

from mlflow.tracking.artifact_utils import _download_artifact_from_uri  # noqa: F401
from mlflow.utils.environment import (  # noqa: F401
    _CONDA_ENV_FILE_NAME,
    _CONSTRAINTS_FILE_NAME,
    _PYTHON_ENV_FILE_NAME,
    _REQUIREMENTS_FILE_NAME,
    _mlflow_conda_env,
    _process_conda_env,
    _process_pip_requirements,
    _PythonEnv,
    _validate_env_arguments,
)
from mlflow.utils.file_utils import write_to  # noqa: F401
from mlflow.utils.model_utils import (  # noqa: F401
    _validate_and_copy_code_paths,
    _validate_and_prepare_target_save_path,
)
from mlflow.utils.requirements_utils import _get_pinned_requirement  # noqa: F401


def write_environment_files(path, conda_env, pip_requirements, extra_pip_requirements, default_requirements):
    """Write conda.yaml, python_env.yaml, requirements.txt (and constraints.txt) into ``path``."""
    import os

    import yaml

    if conda_env is None:
        conda_env, pip_requirements, pip_constraints = _process_pip_requirements(
            default_requirements if pip_requirements is None else None,
            pip_requirements,
            extra_pip_requirements,
        )
    else:
        conda_env, pip_requirements, pip_constraints = _process_conda_env(conda_env)
    with open(os.path.join(path, _CONDA_ENV_FILE_NAME), "w") as f:
        yaml.safe_dump(conda_env, stream=f, default_flow_style=False)
    if pip_constraints:
        write_to(os.path.join(path, _CONSTRAINTS_FILE_NAME), "\n".join(pip_constraints))
    write_to(os.path.join(path, _REQUIREMENTS_FILE_NAME), "\n".join(pip_requirements))
    _PythonEnv.current().to_yaml(os.path.join(path, _PYTHON_ENV_FILE_NAME))
