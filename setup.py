from setuptools import find_packages, setup

from appliance import __version__

# The distribution is sluice-appliance ("sluice" is another project's name on the package
# index); the import package stays `appliance` and the command `sluice`.
setup(
    name="sluice-appliance",
    version=__version__,
    description="Transparent HTTP proxy appliance for Linux gateways: buffer or stream every body",
    packages=find_packages(include=["appliance", "appliance.*"]),
    package_data={"appliance": ["static/*.html"]},     # the admin endpoint's live page
    python_requires=">=3.9",
    install_requires=[
        "gevent>=23.9",
        "dpkt>=1.9.8",
        "netifaces-plus>=0.12",
        "PyYAML>=6.0",
        "orjson>=3.9",
        "prometheus-client>=0.17",
        "rich>=13.0",
    ],
    extras_require={
        "test": ["pytest>=7.4", "hypothesis>=6.90", "h11>=0.14", "websocket-client>=1.6",
                 "jsonschema>=4.17", "websockets>=12"],
    },
    entry_points={"console_scripts": ["sluice=appliance.cli:main"]},
)
