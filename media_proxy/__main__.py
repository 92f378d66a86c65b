from media_proxy.cli import main

raise SystemExit(main())
