# dockerTools' image functions, built by fastlayer.
#
#   tools = import ./nix { fastlayer = <derivation, path with bin/fastlayer, or the executable>; };
#   tools.buildLayeredImage { name = "reg:5000/team/app"; contents = [ hello ]; }
#
# Needs no nixpkgs: every derivation is a plain `builtins.derivation` whose
# builder is fastlayer itself (no shell), reading its arguments from
# `.attrs.json` (structured attrs) and the closure from `exportReferencesGraph`.
# With `pkgs`, `extraCommands` run with coreutils, findutils, gnused, gnugrep on PATH;
# without, with Nix's PATH (none): name tools by absolute path.
# Argument table: README, section "From Nix".
{
  fastlayer,
  pkgs ? null,
  system ? builtins.currentSystem,
}:

let
  inherit (builtins)
    attrNames
    concatStringsSep
    filter
    hasAttr
    isList
    substring
    throw
    ;

  exe =
    if builtins.isAttrs fastlayer then
      "${fastlayer}/bin/fastlayer"
    else if builtins.pathExists "${fastlayer}/bin/fastlayer" then
      "${fastlayer}/bin/fastlayer"
    else
      "${fastlayer}";

  # GOARCH names, as image configs carry them.
  goArch =
    {
      x86_64-linux = "amd64";
      aarch64-linux = "arm64";
      i686-linux = "386";
      armv7l-linux = "arm";
      armv6l-linux = "arm";
      riscv64-linux = "riscv64";
      powerpc64le-linux = "ppc64le";
      s390x-linux = "s390x";
    }
    .${system} or "amd64";

  upper = [ "A" "B" "C" "D" "E" "F" "G" "H" "I" "J" "K" "L" "M" "N" "O" "P" "Q" "R" "S" "T" "U" "V" "W" "X" "Y" "Z" ];
  lower = [ "a" "b" "c" "d" "e" "f" "g" "h" "i" "j" "k" "l" "m" "n" "o" "p" "q" "r" "s" "t" "u" "v" "w" "x" "y" "z" ];
  toLower = builtins.replaceStrings upper lower;

  toList = x: if x == null then [ ] else if isList x then x else [ x ];

  # An evaluation error naming every argument the function does not know.
  checkArgs =
    fn: required: known: args:
    let
      unknown = filter (n: !(builtins.elem n known)) (attrNames args);
      missing = filter (n: !(hasAttr n args)) required;
    in
    if missing != [ ] then
      throw "fastlayer ${fn}: missing argument(s) ${concatStringsSep ", " missing}"
    else if unknown != [ ] then
      throw "fastlayer ${fn}: unknown argument(s) ${concatStringsSep ", " unknown} (known: ${concatStringsSep ", " known})"
    else
      args;

  # value, unless one of checks holds: then an evaluation error with its reason.
  refuse =
    fn: checks: value:
    let
      bad = filter (c: c.when) checks;
    in
    if bad != [ ] then throw "fastlayer ${fn}: ${(builtins.head bad).why}" else value;

  # With pkgs, extraCommands and fakeRootCommands find the usual tools on PATH
  # (structured attrs export no variables: the commands set it themselves).
  toolsPath =
    if pkgs == null then
      null
    else
      concatStringsSep ":" (
        map (p: "${p}/bin") [
          pkgs.coreutils
          pkgs.findutils
          pkgs.gnused
          pkgs.gnugrep
        ]
      );

  # A derivation run by fastlayer: args say what to do; with structured attrs
  # the spec (and the closure graph) are in .attrs.json, placeholders resolved.
  run =
    attrs:
    builtins.derivation (
      {
        inherit system;
        builder = exe;
        __structuredAttrs = true;
      }
      // attrs
    );

  # The result: the derivation plus dockerTools' attributes and the caller's passthru.
  finish =
    drv: extra: passthru: meta:
    drv // extra // passthru // { inherit meta; };

  # The tag Nix knows before the build: the hash part of the conf's store path.
  storeTag = path: substring 0 32 (baseNameOf (builtins.unsafeDiscardStringContext path));

  # dockerTools' layering arguments -> a fastlayer spec (JSON in .attrs.json).
  mkSpec =
    fn: a:
    let
      # "${p}": a path literal is copied into the store, as a builder needs it
      contents = map (p: "${p}") (toList (a.contents or [ ]));
      extra = concatStringsSep "\n" (
        filter (s: s != "") [
          (a.extraCommands or "")
          (a.fakeRootCommands or "")
        ]
      );
      pipeline = a.layeringPipeline or null;
      strategy = if pipeline != null then "pipeline" else a.strategy or "popularity";
      nixDb = a.includeNixDB or false;
    in
    refuse fn [
      {
        when = a.enableFakechroot or false;
        why = "enableFakechroot is not supported: fakeRootCommands run without fakechroot, as the build user, in the staging directory (set owners with `permissions`)";
      }
      {
        when = pipeline != null && (a.strategy or "pipeline") != "pipeline";
        why = "layeringPipeline and strategy = \"${a.strategy}\" contradict each other";
      }
    ] ({
      name = toLower a.name;
      tag = a.tag or null;
      contents = {
        store_paths = contents;
        link_store_paths = a.linkContents or true;
        roots = map (p: "${p}") (toList (a.roots or [ ]));
      } // (if contents != [ ] || nixDb then { graph = ".attrs.json"; } else { });
      include_store_paths = a.includeStorePaths or true;
      max_layers = a.maxLayers or 100;
      inherit strategy;
      from_image = if (a.fromImage or null) == null then null else "${a.fromImage}";
      nix_db = nixDb;
      config = a.config or { };
      architecture = a.architecture or goArch;
      created = a.created or "1970-01-01T00:00:01Z";
      mtime = a.mtime or "1970-01-01T00:00:01Z";
      uid = a.uid or 0;
      gid = a.gid or 0;
      uname = a.uname or "root";
      gname = a.gname or "root";
      extra_commands =
        if extra == "" then
          null
        else if toolsPath == null then
          extra
        else
          "export PATH='${toolsPath}'\n${extra}";
      permissions = a.permissions or [ ];
    }
    // (if pipeline != null then { inherit pipeline; } else { }));

  # conf + customisation layer + stream script from a spec (one derivation,
  # two outputs: `out` the script, `confdir` what it reads).
  mkStream =
    drvName: spec: contents:
    run {
      name = drvName;
      outputs = [
        "out"
        "confdir"
      ];
      fastlayerSpec = spec;
      exportReferencesGraph.closure = contents;
      args = [
        "nix-conf"
        ".attrs.json"
        "--key"
        "fastlayerSpec"
        "-o"
        (builtins.placeholder "confdir")
        "--script"
        (builtins.placeholder "out")
        "--fastlayer"
        exe
      ];
    };

  compressionOf =
    a:
    let
      byCompressor = {
        none = "none";
        gz = "gzip";
        zstd = "zstd";
      };
    in
    if a ? compression then
      a.compression
    else if a ? compressor then
      byCompressor.${a.compressor} or (throw "fastlayer: compressor must be none, gz or zstd, not ${a.compressor}")
    else
      "none";

  # A derivation builds in isolation: no layer cache (nothing to share, and
  # without a sandbox it would land in $HOME, which Nix wants absent).
  # The image file: stream-nix on the conf (the same bytes the script streams),
  # or `fastlayer build` of the same spec for OCI formats and compression.
  mkBuilt =
    fn: a: stream: baseName:
    let
      format = a.format or "docker-archive";
      compression = compressionOf a;
      suffix =
        {
          none = ".tar";
          gzip = ".tar.gz";
          zstd = ".tar.zst";
        }
        .${compression} or (throw "fastlayer ${fn}: compression must be none, gzip or zstd, not ${compression}");
      name =
        {
          docker-archive = "${baseName}${suffix}";
          oci-archive = "${baseName}-oci.tar";
          oci-dir = "${baseName}-oci";
        }
        .${format} or (throw "fastlayer ${fn}: format must be docker-archive, oci-dir or oci-archive, not ${format}");
      out = builtins.placeholder "out";
      args =
        if format == "docker-archive" && compression == "none" then
          [ "stream-nix" stream.conf "-o" out "-q" "--no-cache" ]
        else
          [ "build" stream.spec "-o" out "--format" format "--compress" compression "-q" "--no-cache" ];
    in
    run { inherit name args; };

  layeredArgs = [
    "name" "tag" "fromImage" "contents" "config" "architecture" "created" "mtime"
    "uid" "gid" "uname" "gname" "maxLayers" "extraCommands" "fakeRootCommands"
    "enableFakechroot" "includeStorePaths" "includeNixDB" "passthru" "meta"
    "layeringPipeline" "debug" "strategy" "permissions"
  ];
  buildArgs = [ "compression" "compressor" "format" ];

  streamLayered =
    fn: args:
    let
      a = checkArgs fn [ "name" ] layeredArgs args;
      spec = mkSpec fn a;
      baseName = baseNameOf a.name;
      drv = mkStream "stream-${baseName}" spec spec.contents.store_paths;
      imageTag = if spec.tag != null then spec.tag else storeTag drv.confdir.outPath;
    in
    finish drv {
      imageName = spec.name;
      inherit imageTag;
      isExe = true;
      conf = "${drv.confdir}/conf.json";
      spec = "${drv.confdir}/spec.json";
      fastlayerSpec = spec;
    } (a.passthru or { }) (a.meta or { });

  streamLayeredImage = streamLayered "streamLayeredImage";

  buildLayeredImage =
    args:
    let
      fn = "buildLayeredImage";
      a = checkArgs fn [ "name" ] (layeredArgs ++ buildArgs) args;
      stream = streamLayered fn (removeAttrs a buildArgs);
    in
    finish (mkBuilt fn a stream (baseNameOf a.name)) {
      inherit (stream) imageName imageTag conf spec fastlayerSpec;
      inherit stream;
    } (a.passthru or { }) (a.meta or { });

  # One store layer holding the whole closure of copyToRoot, whose contents
  # are copied into / in the customisation layer (2 layers on the base, where
  # nixpkgs makes 1; symlinks are kept as they are, as keepContentsDirlinks).
  buildImage =
    args:
    let
      fn = "buildImage";
      known = [
        "name" "tag" "fromImage" "fromImageName" "fromImageTag" "copyToRoot" "contents"
        "keepContentsDirlinks" "config" "architecture" "runAsRoot" "extraCommands"
        "uid" "gid" "diskSize" "buildVMMemorySize" "created" "mtime" "meta" "passthru"
        "includeNixDB" "permissions"
      ] ++ buildArgs;
      a0 = checkArgs fn [ "name" ] known args;
      a = refuse fn [
        {
          when = (a0.runAsRoot or null) != null;
          why = "runAsRoot needs root in a VM; use extraCommands and `permissions` (owners and modes without root)";
        }
        {
          when = (a0.fromImageName or null) != null || (a0.fromImageTag or null) != null;
          why = "fromImageName/fromImageTag are not supported: give fromImage a single-image archive";
        }
      ] a0;
      roots = toList (a.copyToRoot or a.contents or null);
      spec =
        mkSpec fn (
          removeAttrs a ([ "copyToRoot" "contents" "runAsRoot" "fromImageName" "fromImageTag"
            "keepContentsDirlinks" "diskSize" "buildVMMemorySize" ] ++ buildArgs)
          // {
            contents = roots;
            inherit roots;
            linkContents = false;
            layeringPipeline = [ [ "popularity_contest" ] [ "limit_layers" 1 ] ];
          }
        );
      baseName = baseNameOf a.name;
      stream = mkStream "docker-image-${baseName}-conf" spec spec.contents.store_paths;
      imageTag = if spec.tag != null then spec.tag else storeTag stream.confdir.outPath;
      streamed = stream // {
        conf = "${stream.confdir}/conf.json";
        spec = "${stream.confdir}/spec.json";
      };
    in
    finish (mkBuilt fn a streamed "docker-image-${baseName}") {
      imageName = spec.name;
      inherit imageTag;
      inherit (streamed) conf spec;
      fastlayerSpec = spec;
      stream = stream;
    } (a.passthru or { }) (a.meta or { });

  # One docker-archive holding every image (`fastlayer merge`).
  mergeImages =
    images:
    run {
      name = "merged-images.tar";
      args = [ "merge" ] ++ map (i: "${i}") images ++ [ "-o" (builtins.placeholder "out") "--compress" "none" ];
    };

  # A fixed-output derivation: `fastlayer pull NAME@DIGEST`, every digest checked.
  pullImage =
    args:
    let
      fn = "pullImage";
      a = checkArgs fn [ "imageName" "imageDigest" ] [
        "imageName" "imageDigest" "sha256" "hash" "os" "arch" "tlsVerify"
        "finalImageName" "finalImageTag" "name"
      ] args;
      hash = a.hash or a.sha256 or (throw "fastlayer pullImage: give hash (SRI) or sha256");
      finalImageName = a.finalImageName or a.imageName;
      finalImageTag = a.finalImageTag or "latest";
      safe = builtins.replaceStrings [ "/" ":" "@" ] [ "-" "-" "-" ];
      drv = run {
        # exported variables: the registry blob cache goes to the build's own
        # directory, not $HOME (/homeless-shelter must stay missing)
        __structuredAttrs = false;
        XDG_CACHE_HOME = ".cache";
        name = a.name or "docker-image-${safe (baseNameOf finalImageName)}-${safe finalImageTag}.tar";
        outputHashAlgo = "sha256";
        outputHashMode = "flat";
        outputHash = hash;
        impureEnvVars = [ "http_proxy" "https_proxy" "no_proxy" "HTTP_PROXY" "HTTPS_PROXY" "NO_PROXY" ];
        args = [
          "pull" "${a.imageName}@${a.imageDigest}" "-o" (builtins.placeholder "out") "-q"
          "--os" (a.os or "linux") "--arch" (a.arch or goArch)
          "--final-name" finalImageName "--final-tag" finalImageTag
        ] ++ (if a.tlsVerify or true then [ ] else [ "--insecure" ]);
      };
    in
    drv // {
      imageName = finalImageName;
      imageTag = finalImageTag;
    };

  # etc/passwd, etc/group (root and nobody), etc/nsswitch.conf, var/empty.
  fakeNss = run {
    name = "fake-nss";
    args = [ "fake-nss" (builtins.placeholder "out") ];
  };
in
{
  inherit
    streamLayeredImage
    buildLayeredImage
    buildImage
    mergeImages
    pullImage
    fakeNss
    ;
}
