"""A1111's script base class, as far as an AlwaysOn script uses it: `show(is_img2img)` returns
`AlwaysVisible` to be an always-on panel in that tab."""

AlwaysVisible = object()


class Script:
    def title(self):
        raise NotImplementedError

    def show(self, is_img2img):
        return True
