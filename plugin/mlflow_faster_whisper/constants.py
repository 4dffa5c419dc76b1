"""Names shared by everything that reads or writes a ``faster_whisper`` model directory.

The flavor configuration in ``MLmodel`` is the contract between the flavor, the registry and the
service: every key lives here so no module spells one as a string literal.
"""

FLAVOR_NAME = "faster_whisper"
MLMODEL_FILE_NAME = "MLmodel"

# The CTranslate2 model directory inside the MLflow model directory.
MODEL_DATA_SUBPATH = "model"

# Keys of the flavor configuration written to MLmodel.
DATA = "data"
QUANTIZATION = "quantization"
CTRANSLATE2_VERSION = "ctranslate2_version"
FASTER_WHISPER_VERSION = "faster_whisper_version"
TRANSFORMERS_VERSION = "transformers_version"
SOURCE = "source"
CHECKSUMS = "checksums"
SIZE_BYTES = "size_bytes"
N_MELS = "n_mels"
MULTILINGUAL = "multilingual"
DECODING = "decoding"

# Keys of the source lineage (the value of SOURCE).
SOURCE_KIND = "kind"
SOURCE_PATH = "path"
SOURCE_BASE_MODEL = "base_model"
SOURCE_ADAPTER = "adapter"
SOURCE_REVISION = "revision"
SOURCE_RUN_ID = "run_id"

# Files faster-whisper reads from the CTranslate2 directory. Without tokenizer.json it silently
# goes to the model hub; without preprocessor_config.json it assumes 80 mel bins.
REQUIRED_CT2_FILES = ("model.bin", "config.json", "tokenizer.json", "preprocessor_config.json")

# The pyfunc input column, and the output field that carries a row's error.
AUDIO_COLUMN = "audio"
ERROR_COLUMN = "error"

SAMPLE_RATE = 16000
