# fastlayer for nixpkgs users: `pkgs.callPackage ./nix/package.nix { }`.
# Its result is the `fastlayer` that nix/default.nix takes.
{
  lib,
  python3Packages,
}:

python3Packages.buildPythonApplication {
  pname = "fastlayer";
  version = "0.1.0"; # as in pyproject.toml
  pyproject = true;

  src = lib.cleanSourceWith {
    src = ../.;
    filter = path: type: !(lib.hasInfix "/build/" path) && !(lib.hasSuffix ".so" path);
  };

  build-system = with python3Packages; [
    setuptools
    cython
    numpy
  ];

  dependencies = with python3Packages; [
    numpy
    zstandard
    isal
    tqdm
    requests
  ];

  # The suite needs podman, skopeo, umoci and a registry: run it outside Nix.
  doCheck = false;
  pythonImportsCheck = [
    "fastlayer"
    "fastlayer._native.tarstream"
  ];

  meta = {
    description = "Native-accelerated builder of layered container images from Nix closures";
    license = lib.licenses.mit;
    mainProgram = "fastlayer";
  };
}
