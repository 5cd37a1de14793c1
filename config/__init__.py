"""The reference configuration, config/loopwatch.yaml: package data of the
wheel (as loopwatch.config), which `loopwatch example-config` prints for an
install without this source tree. The examples beside it are not shipped."""
