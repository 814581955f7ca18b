"""tfds builders that moejax.data builds on demand (array_record files, read through `tfds.data_source`)."""
from moejax.datasets.text_files import (MoejaxStdlib, MoejaxTextDir, is_validation, split_files, stdlib_config,
                                        stdlib_files, text_dir_config, text_dir_files)

__all__ = ["MoejaxStdlib", "MoejaxTextDir", "is_validation", "split_files", "stdlib_config", "stdlib_files",
           "text_dir_config", "text_dir_files"]
