from setuptools import find_packages, setup

setup(
    name="t2i",
    version="0.1.0",
    description="Text-to-image serving: a scheduler and GPU workers in front of ComfyUI",
    # The page (static/, kept at the top of the repository) ships inside the package as t2i/static,
    # where the scheduler finds it (t2i.config.default_static_dir) from any working directory.
    packages=find_packages(include=["t2i", "t2i.*"]) + ["t2i.static"],
    package_dir={"t2i.static": "static"},
    package_data={"t2i": ["openapi.yaml", "workflows/*.json"], "t2i.static": ["*", "**/*"]},
    python_requires=">=3.10",
    install_requires=[
        # The version the suite runs against (today also the newest 6.x, so CI tests this floor).
        "tornado>=6.6.1,<7",
        "pyyaml>=6.0",
        "prometheus-client>=0.17",
    ],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-tornado>=0.8.1",
            # pytest-tornado imports pkg_resources, which setuptools 82 removed; 70.1 builds wheels
            # without the `wheel` package (tests/test_packaging.py builds one, offline).
            "setuptools>=70.1,<82",
            "pytest-timeout>=2.2",
            "playwright>=1.40",
            # The scheduler's default client (measured faster); tests cover both.
            "pycurl>=7.45",
            # tests/test_fuzz.py: both servers fuzzed from their OpenAPI documents (4.x Python API).
            "schemathesis>=4.32,<5",
        ],
        "curl": ["pycurl>=7.45"],
    },
    entry_points={
        "console_scripts": [
            "t2i-scheduler=t2i.scheduler.__main__:main",
            "t2i-worker=t2i.worker.__main__:main",
            "t2i-demo=t2i.demo:main",
        ]
    },
)
