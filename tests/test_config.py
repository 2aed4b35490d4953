"""common/config.py: every variable parsed, validated, and documented in the README."""
import os
import re

import pytest
from helpers import ROOT, config_variables

from common.config import Config, ConfigError


def test_defaults_match_design():
    c = Config.from_env({})
    assert c.model_path == "tf_files/demo" and c.port == 8000 and c.host == "127.0.0.1"
    assert c.temp_max_files == 1000 and c.temp_max_mb == 512 and c.max_upload_mb == 16
    assert c.max_image_pixels == 50_000_000 and c.url_fetch_timeout == 10
    assert c.url_allow_hosts == () and c.top_k is None


def test_env_values_are_parsed():
    c = Config.from_env({"PORT": "9000", "URL_ALLOW_HOSTS": "127.0.0.1, 10.0.0.0/8,Img.Local",
                         "TOP_K": "3", "INPUT_SIZE": "224x224", "LOG_LEVEL": "DEBUG",
                         "LABELS_PATH": "", "EXIT_ON_LOAD_FAILURE": "false"})
    assert c.port == 9000 and c.top_k == 3 and c.input_size == (224, 224)
    assert c.url_allow_hosts == ("127.0.0.1", "10.0.0.0/8", "img.local")
    assert c.log_level == "debug" and c.labels_path is None and not c.exit_on_load_failure


@pytest.mark.parametrize("name,value", [
    ("PORT", "eighty"), ("PORT", "-1"), ("TEMP_MAX_FILES", "0"), ("MAX_UPLOAD_MB", "0"),
    ("URL_ALLOW_HOSTS", "10.0.0.0/99"), ("TOP_K", "0"), ("LOG_LEVEL", "loud"),
    ("INPUT_SIZE", "1x2x3"), ("PRECISION", "fp8"), ("URL_FETCH_TIMEOUT", "-3"),
])
def test_bad_values_name_the_variable(name, value):
    with pytest.raises(ConfigError, match=name):
        Config.from_env({name: value})


def test_unknown_test_setting_is_refused():
    with pytest.raises(ConfigError):
        Config.from_mapping({"no_such_setting": 1})


def test_readme_documents_every_variable():
    with open(os.path.join(ROOT, "README.md")) as fh:
        readme = fh.read()
    table = set(re.findall(r"^\| `([A-Z_]+)` \|", readme, flags=re.M))
    assert config_variables() <= table, config_variables() - table
