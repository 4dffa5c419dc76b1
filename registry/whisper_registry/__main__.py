import sys

from whisper_registry.cli import main

sys.exit(main())
