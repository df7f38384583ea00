import sys

from ...errors import EDiTError
from .cli import main

try:
    sys.exit(main())
except EDiTError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
